#!/usr/bin/env bash
# The production chain through the real CLI on a GPU, with random-weight SD1.5-size models (issue 17, item 4):
# models in their real formats, synth + prepare, anchor and reconfigure through DeepSpeed, kill and resume, evaluate,
# register, serve over HTTP (CUDA graphs) called with kserve's client, graph replay vs the plain path. Prints each
# stage's time and peak memory; exits non-zero on any failure (benchmarks/gpu_check.py).
#
#   bash benchmarks/gpu_check.sh [--tiny] [--compile] [--steps N] [--work DIR]
#
# --tiny (or GPU_CHECK_TINY=1) runs the same stages on a CPU at small widths in a few minutes (the plumbing check).
#
# On the offline GPU machine (torch there, but not diffusers, DeepSpeed, kserve, MLflow...): first, where PyPI is
# reachable, fetch the wheels of benchmarks/requirements-gpu-check.txt into .whl/ (DeepSpeed comes as its sdist and
# is built there, with its CPU/CUDA ops compiled at first use):
#   bash benchmarks/fetch_wheels.sh benchmarks/requirements-gpu-check.txt
# then, with the device tool (one H200; `carry: [".whl"]`, timeout 600; results come back under $OUT):
#   bash benchmarks/gpu_check.sh --work /tmp/gpu-check
# The script installs .whl/ into /tmp/dynamicid-site itself (only when the stack is missing). Not yet run on a GPU:
# the SD1.5-size stage times are unknown; training is eager unless --compile (each compiled start took ~2.5 minutes
# on an H200, issue 17). If one 10-minute call is not enough, lower --steps / --identities first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
PY="${GPU_CHECK_PYTHON:-$PY}"
# The carried wheels only where the stack is missing (the GPU image), never over a working environment.
if ! "$PY" -c "import diffusers, deepspeed, kserve, mlflow" >/dev/null 2>&1 && compgen -G ".whl/*" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --no-build-isolation --target /tmp/dynamicid-site .whl/*
  export PYTHONPATH="/tmp/dynamicid-site${PYTHONPATH:+:$PYTHONPATH}" PATH="/tmp/dynamicid-site/bin:$PATH"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
LOG_DIR="${OUT:-}"
if [ -n "$LOG_DIR" ]; then
  set -o pipefail
  "$PY" -m benchmarks.gpu_check "$@" 2>&1 | tee "$LOG_DIR/gpu_check.log"
else
  exec "$PY" -m benchmarks.gpu_check "$@"
fi
