"""The MLflow side of a DynamicID model: the pyfunc flavour and the registry operations.

Imported only by the commands that use MLflow (evaluate, register) and by whoever loads a
registered model, so importing mlflow at module level here keeps ``dynamicid --help`` light.

The registered model is a pyfunc ``DynamicIDPyfunc`` whose only artefact is the checkpoint
directory (``artifacts/<checkpoint dir name>/manifest.json`` ...; model.checkpoint.find_checkpoint
finds it in a downloaded model), with the params needed to rebuild the pipeline in its
model_config. ``mlflow.pyfunc.load_model("models:/dynamicid@champion")`` loads and runs it.

Publishing is atomic for readers of aliases: log the model, create the version (with every lineage
tag in the same call), wait for READY, download it back and compare its files with the
evaluated checkpoint, and only then move the aliases. Any failure in between deletes the version,
so no alias ever points at an incomplete or different model.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import logging
import math
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable

import mlflow
import mlflow.pyfunc
import pandas as pd
from mlflow.entities.model_registry import ModelVersion
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, DataType, Schema
from mlflow.types.schema import Array

from components.core.registry import (
    RegistryError,
    alias_version,
    checkpoint_digest,
    client,
)

log = logging.getLogger(__name__)

PARAMS_SECTIONS = ("model", "face", "storage", "serve")
# What the pyfunc needs at run time; pinned to the versions it was logged with.
REQUIREMENTS = ("torch", "diffusers", "transformers", "safetensors", "pillow", "numpy", "pandas", "pydantic",
                "pyyaml", "opencv-python-headless", "scikit-image", "mlflow")
BACKEND_REQUIREMENTS = {"dlib": ("dlib-bin", "face-recognition-models"), "insightface": ("insightface", "onnxruntime")}


# --------------------------------------------------------------------------- checkpoints


# --------------------------------------------------------------------------- the pyfunc model


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _as_list(v: Any) -> list:
    if _missing(v):
        return []
    if hasattr(v, "tolist"):
        v = v.tolist()
    return list(v) if isinstance(v, (list, tuple)) else [v]


def _records(model_input: Any) -> list[dict]:
    """DataFrame rows, one request dict, or a list of request dicts -> list of request dicts."""
    if isinstance(model_input, pd.DataFrame):
        return model_input.to_dict(orient="records")
    if isinstance(model_input, dict):
        return [model_input]
    if isinstance(model_input, list) and all(isinstance(r, dict) for r in model_input):
        return list(model_input)
    raise ValueError(f"expected a DataFrame, a request dict or a list of them, got {type(model_input).__name__}")


def encode_png_b64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    keys = dotted.split(".")
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value


class DynamicIDPyfunc(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper of DynamicIDPipeline.

    Request (one DataFrame row or dict): ``prompt`` (required), ``images`` (list of base64-encoded
    image files, one per person), optional ``expressions`` (per person, "" = none), ``bboxes`` (per
    person [y0, x0, y1, x1] in [0, 1], [] = default strip), ``negative_prompt``, ``seed``, ``steps``,
    ``guidance_scale``, ``id_scale``, ``height``, ``width``. Response row: ``image`` (base64 PNG),
    ``seed``, ``identities`` (JSON: region used and edit applied per person).

    model_config holds ``params`` (model, face, storage, serve sections); dotted keys given at load
    time override them, e.g. ``load_model(uri, model_config={"model.device": "cuda:1"})``.
    """

    def load_context(self, context) -> None:
        from components.core.config import params_from_dict
        from components.core.runtime import pipeline_from_params
        from model.checkpoint import find_checkpoint

        cfg = dict(context.model_config or {})
        raw = copy.deepcopy(cfg.get("params") or {})
        for key, value in cfg.items():
            if "." in key:
                _set_dotted(raw, key, value)
        self.params = params_from_dict(raw, "model_config")
        ckpt = find_checkpoint(context.artifacts["checkpoint"])
        self.pipe = pipeline_from_params(self.params, ckpt)
        self.pipe.set_progress(False)

    def _request(self, r: dict, n: int) -> dict:
        from model.face_analysis.images import load_image
        from model.pipeline import GenerationError, IdentityInput

        who = f"request {n}"
        prompt = r.get("prompt")
        if _missing(prompt) or not isinstance(prompt, str):
            raise GenerationError(f"{who}: 'prompt' (a string) is required")
        images = _as_list(r.get("images"))
        exprs = _as_list(r.get("expressions"))
        boxes = _as_list(r.get("bboxes"))
        if len(exprs) > len(images) or len(boxes) > len(images):
            raise GenerationError(f"{who}: more expressions/bboxes than images")
        ids = []
        for i, b64 in enumerate(images):
            try:
                data = base64.b64decode(str(b64), validate=True)
            except ValueError:
                raise GenerationError(f"{who}: images[{i}] is not valid base64") from None
            box = _as_list(boxes[i]) if i < len(boxes) else []
            expr = exprs[i] if i < len(exprs) and not _missing(exprs[i]) and exprs[i] != "" else None
            ids.append(IdentityInput(image=load_image(data), bbox=box or None, expression=expr))
        serve = self.params.serve
        steps = int(r["steps"]) if not _missing(r.get("steps")) else serve.default_steps
        if not 1 <= steps <= serve.max_steps:
            raise GenerationError(f"{who}: steps must be between 1 and {serve.max_steps}, got {steps}")

        def opt(key: str, cast: Callable, default: Any = None) -> Any:
            return cast(r[key]) if not _missing(r.get(key)) else default

        return dict(prompt=prompt, identities=ids, negative_prompt=opt("negative_prompt", str),
                    num_inference_steps=steps, guidance_scale=opt("guidance_scale", float, serve.default_guidance),
                    id_scale=opt("id_scale", float), height=opt("height", int), width=opt("width", int),
                    seed=opt("seed", int, 0))

    # The DataFrame hint tells MLflow to validate with the logged signature (not with type hints);
    # dicts and lists of dicts arrive here already converted to a DataFrame by that validation.
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from model.face_analysis.face import FaceAnalysisError
        from model.pipeline import GenerationError

        out = []
        for n, r in enumerate(_records(model_input)):
            try:
                req = self._request(r, n)
                res = self.pipe(req.pop("prompt"), req.pop("identities"), **req)
            except (FaceAnalysisError, GenerationError) as err:
                msg = str(err)
                raise GenerationError(msg if msg.startswith("request ") else f"request {n}: {msg}") from None
            out.append({"image": encode_png_b64(res.images[0]), "seed": int(res.seeds[0]),
                        "identities": json.dumps([vars(x) for x in res.identities[0]])})
        return pd.DataFrame(out, columns=["image", "seed", "identities"])


def signature() -> ModelSignature:
    opt = dict(required=False)
    inputs = Schema([
        ColSpec(DataType.string, "prompt"),
        ColSpec(Array(DataType.string), "images", **opt),
        ColSpec(Array(DataType.string), "expressions", **opt),
        ColSpec(Array(Array(DataType.double)), "bboxes", **opt),
        ColSpec(DataType.string, "negative_prompt", **opt),
        ColSpec(DataType.long, "seed", **opt),
        ColSpec(DataType.long, "steps", **opt),
        ColSpec(DataType.double, "guidance_scale", **opt),
        ColSpec(DataType.double, "id_scale", **opt),
        ColSpec(DataType.long, "height", **opt),
        ColSpec(DataType.long, "width", **opt),
    ])
    outputs = Schema([ColSpec(DataType.string, "image"), ColSpec(DataType.long, "seed"),
                      ColSpec(DataType.string, "identities")])
    return ModelSignature(inputs=inputs, outputs=outputs)


def pip_requirements(backend: str) -> list[str]:
    """The run-time packages at the versions installed now. The dynamicid package itself comes
    from the serving image (it is not on an index); see docs/evaluation.md."""
    reqs = []
    for name in REQUIREMENTS + BACKEND_REQUIREMENTS.get(backend, ()):
        try:
            reqs.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            log.debug("requirement %s is not installed here; left out", name)
    return reqs


def model_config(params) -> dict:
    """The params a loader needs to rebuild the pipeline (no credentials: params never hold any)."""
    dump = params.model_dump(mode="json")
    return {"params": {k: dump[k] for k in PARAMS_SECTIONS}}


def log_model(params, ckpt: str | Path, *, name: str = "model"):
    """Log the pyfunc model with the checkpoint as its artefact (into the active run)."""
    import warnings

    backend = params.face.resolved_backend(params.model.profile)
    with warnings.catch_warnings():
        # An input example would make MLflow load the whole pipeline and run it while logging; the
        # signature already describes the request, and the registry step verifies the artefacts.
        warnings.filterwarnings("ignore", message=".*input example was not provided.*")
        return mlflow.pyfunc.log_model(
            name=name, python_model=DynamicIDPyfunc(), artifacts={"checkpoint": str(ckpt)},
            model_config=model_config(params), signature=signature(), pip_requirements=pip_requirements(backend),
            metadata={"profile": params.model.profile, "face_backend": backend,
                      "checkpoint_digest": checkpoint_digest(ckpt)},
        )


# --------------------------------------------------------------------------- registry


def wait_ready(c, name: str, version: str, timeout_s: float) -> ModelVersion:
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        mv = c.get_model_version(name, version)
        if mv.status == "READY":
            return mv
        if mv.status == "FAILED_REGISTRATION" or time.monotonic() > deadline:
            raise RegistryError(f"{name} v{version}: status {mv.status} ({mv.status_message or 'no message'})")
        time.sleep(0.5)


def verify_version(name: str, version: str, digest: str) -> None:
    """Download the registered version and check that it is a pyfunc model holding exactly the
    evaluated checkpoint (every file's sha256, bundled base included)."""
    import yaml

    with tempfile.TemporaryDirectory(prefix="dynamicid-verify-") as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=tmp))
        mlmodel = local / "MLmodel"
        if not mlmodel.exists():
            raise RegistryError(f"{name} v{version}: no MLmodel file in the registered artefacts")
        flavors = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {})
        if "python_function" not in flavors:
            raise RegistryError(f"{name} v{version}: not a pyfunc model (flavors: {sorted(flavors)})")
        from model.checkpoint import CheckpointError, find_checkpoint

        try:
            got = checkpoint_digest(find_checkpoint(local))
        except CheckpointError as err:
            raise RegistryError(f"{name} v{version}: {err}") from None
        if got != digest:
            raise RegistryError(f"{name} v{version}: registered checkpoint files differ from the evaluated "
                                f"checkpoint (digest {got[:12]} != {digest[:12]})")


def _first_line(err: BaseException, limit: int = 300) -> str:
    """An exception's first line: MLflow/requests errors can carry whole response bodies."""
    text = str(err).strip().splitlines()
    return (text[0] if text else "")[:limit]


def publish(params, ckpt: str | Path, *, tags: dict[str, str], aliases: Iterable[str],
            description: str | None = None) -> ModelVersion:
    """Log, register, wait, verify, then move aliases; on any failure remove the new version. ``description``
    (e.g. where imported weights came from) is set on the version before it is verified, so a version that
    exists at the end always carries it.

    Must be called inside an active MLflow run (the model is logged into it).
    """
    name = params.mlflow.registered_model
    digest = checkpoint_digest(ckpt)
    c = client()
    try:  # nothing is registered yet: a failure here (artefact store down after retries) leaves no version
        info = log_model(params, ckpt)
    except Exception as err:  # noqa: BLE001 - MlflowException, requests/boto errors: all mean "not uploaded"
        raise RegistryError(f"uploading the model artefacts of {name} failed after retries "
                            f"({type(err).__name__}: {_first_line(err)}); nothing was registered") from err
    try:
        # No waiting inside register_model: once the version exists, every wait happens in the
        # try below, whose failure path deletes it.
        mv = mlflow.register_model(info.model_uri, name, await_registration_for=0,
                                   tags={**tags, "checkpoint_digest": digest})
    except Exception as err:  # noqa: BLE001
        raise RegistryError(f"creating a version of {name} failed ({type(err).__name__}: {_first_line(err)}); "
                            f"nothing was registered") from err
    aliases = list(aliases)
    previous: dict[str, str] = {}  # alias -> version it pointed to before this call (moved ones only)
    try:
        mv = wait_ready(c, name, mv.version, params.gate.await_registration_s)
        if description:
            c.update_model_version(name, mv.version, description=description)
        verify_version(name, mv.version, digest)
        c.set_model_version_tag(name, mv.version, "verified", "true")
        for alias in aliases:
            old = alias_version(c, name, alias)
            previous[alias] = old.version if old is not None else ""
            c.set_registered_model_alias(name, alias, mv.version)
    except BaseException as err:
        log.error("registration of %s v%s failed (%s): deleting the version", name, mv.version,
                  _first_line(err))
        try:
            c.delete_model_version(name, mv.version)  # also drops any alias already moved to it
            for alias, version in previous.items():
                if version:
                    c.set_registered_model_alias(name, alias, version)
        except Exception as cleanup:  # noqa: BLE001 - logged, the original error is raised
            log.error("could not clean up %s v%s: %s", name, mv.version, _first_line(cleanup))
        if isinstance(err, RegistryError) or not isinstance(err, Exception):
            raise
        raise RegistryError(f"{name} v{mv.version}: {type(err).__name__}: {_first_line(err)}; "
                            f"the version was removed") from err
    return c.get_model_version(name, mv.version)

