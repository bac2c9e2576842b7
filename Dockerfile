# syntax=docker/dockerfile:1
# Project image: every `dynamicid` stage (prepare, train under torchrun + DeepSpeed, evaluate,
# register, deploy, pipeline) and the MLflow tracking server (k8s/base/mlflow.yaml) run from it.
#
#   docker build -t ghcr.io/dynamicid/dynamicid:0.1.0 .                       # CUDA torch
#   docker build --build-arg TORCH_BACKEND=cpu -t dynamicid:cpu .             # CPU-only, smaller
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
# Which torch build to bundle: a CUDA tag (cu126, cu128, ...) that matches the nodes' driver, or
# cpu. uv maps it to PyTorch's own wheel index, so no index URL is hard-coded here.
ARG TORCH_BACKEND=cu128
ARG TORCH_VERSION=2.13.0
ARG EXTRAS=train,serve,pipeline
# A compiler for the few dependencies that publish source distributions only.
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
RUN pip install --no-cache-dir uv
ENV UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_NO_CACHE=1
RUN uv venv /opt/venv
# torch first, pinned, then everything else resolved with torch held at that version: the same
# two-step install as the Makefile, so the extras can never swap in a different torch build.
RUN uv pip install --python /opt/venv/bin/python --torch-backend "${TORCH_BACKEND}" "torch==${TORCH_VERSION}" \
 && /opt/venv/bin/python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > /opt/torch-constraint.txt
COPY pyproject.toml README.md /src/
COPY model /src/model
COPY components /src/components
COPY pipelines /src/pipelines
COPY serving /src/serving
# The PyTorchJob and InferenceService templates ship in the wheel (launch/deploy patch them).
COPY k8s/base/pytorchjob-anchor.yaml k8s/base/inferenceservice.yaml /src/k8s/base/
# psycopg2-binary: the MLflow server's PostgreSQL backend store driver (k8s/base/mlflow.yaml).
RUN uv pip install --python /opt/venv/bin/python --constraint /opt/torch-constraint.txt \
      "/src[${EXTRAS}]" "psycopg2-binary>=2.9"

FROM ${PYTHON_IMAGE}
# libgomp1: OpenMP runtime for onnxruntime and the face models' CPU kernels.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 1000 --user-group --create-home --home-dir /home/dynamicid dynamicid
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# Numeric, so that Kubernetes can verify runAsNonRoot without looking the name up.
USER 1000:1000
WORKDIR /home/dynamicid
ENTRYPOINT ["dynamicid"]
CMD ["--help"]
