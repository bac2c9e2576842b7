"""What a training stage records: an MLflow run, ``loss.tsv`` (for ``dvc plots``) and ``metrics.json``.

Only rank 0 records; on other ranks every method is a no-op. Per-step metrics are buffered
and written with one ``log_batch`` call every ``log_every`` steps (one sqlite transaction
instead of one per value), so every step is in the run without slowing the loop down.
A resumed stage re-opens the MLflow run recorded in ``<output>/mlflow_run.json``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)

RUN_FILE = "mlflow_run.json"


class StageTracker:
    def __init__(self, params, stage: str, out_dir: Path, enabled: bool):
        self.params = params
        self.stage = stage
        self.out = Path(out_dir)
        self.enabled = enabled
        self.run_id: str | None = None
        self._mlflow = None
        self._pending: list = []
        self._tsv: dict[str, tuple[Path, list[str]]] = {}

    # ------------------------------------------------------------------ run
    def start(self, resume: bool, extra_params: dict[str, Any]) -> None:
        if not self.enabled:
            return
        from components.core.config import flatten, params_hash
        from components.core.redact import known_secrets, redact_params
        from components.core.tracking import data_version, git_commit, setup_mlflow

        # Nothing may reach the network at run time; MLflow 3 would fetch a telemetry config.
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

        self.out.mkdir(parents=True, exist_ok=True)
        mlflow = setup_mlflow(self.params)
        self._mlflow = mlflow
        previous = self._previous_run() if resume else None
        if previous:
            mlflow.start_run(run_id=previous)
            mlflow.set_tag("resumed", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        else:
            mlflow.start_run(run_name=f"train-{self.stage}")
            lineage = {"git_commit": git_commit(), "data_version": data_version(self.params.data.prepared),
                       "params_hash": params_hash(self.params), "stage": self.stage}
            # Params may carry URIs with credentials (endpoint, tracking, KFP host) or secret env
            # values (pipeline.env): MLflow params are readable by everyone with the experiment.
            secrets = known_secrets()
            flat = {k: _param_value(v) for k, v in redact_params(flatten(self.params), secrets).items()}
            extra = {k: _param_value(v) for k, v in redact_params(extra_params, secrets).items()}
            mlflow.log_params({**flat, **lineage, **extra})
            mlflow.set_tags({"dynamicid.stage": self.stage, "mlflow.source.git.commit": lineage["git_commit"],
                             "dynamicid.data_version": lineage["data_version"]})
        self.run_id = mlflow.active_run().info.run_id
        (self.out / RUN_FILE).write_text(json.dumps({"run_id": self.run_id, "experiment": self.params.mlflow.experiment,
                                                     "stage": self.stage}, indent=2))

    def _previous_run(self) -> str | None:
        path = self.out / RUN_FILE
        if not path.exists():
            return None
        run_id = json.loads(path.read_text()).get("run_id")
        try:
            self._mlflow.get_run(run_id)
        except Exception:  # noqa: BLE001 - a run from another tracking store: start a new one
            log.warning("MLflow run %s of the previous attempt is not in this tracking store; starting a new run",
                        run_id)
            return None
        return run_id

    def finish(self, status: str = "FINISHED") -> None:
        if not self.enabled or self._mlflow is None:
            return
        self.flush()
        self._mlflow.end_run(status=status)
        self._mlflow = None

    @contextlib.contextmanager
    def running(self) -> Iterator["StageTracker"]:
        """The stage's body: its MLflow run ends FAILED if the body raises (or is interrupted), else
        FINISHED; an early ``finish()`` inside is fine (ending is idempotent)."""
        try:
            yield self
        except BaseException:
            self.finish("FAILED")
            raise
        self.finish()

    # ------------------------------------------------------------------ metrics
    def loss_table(self, name: str, columns: list[str], resume_step: int) -> None:
        """Open ``<out>/<name>`` for per-step rows; rows after ``resume_step`` (re-done now) are dropped."""
        if not self.enabled:
            return
        path = self.out / name
        header = ["step", *columns]
        rows: list[str] = []
        if resume_step > 0 and path.exists():
            lines = path.read_text().splitlines()
            if lines and lines[0].split("\t") == header:
                rows = [ln for ln in lines[1:] if ln and int(ln.split("\t")[0]) <= resume_step]
        path.write_text("\n".join(["\t".join(header), *rows]) + "\n")
        self._tsv[name] = (path, columns)

    def log_step(self, step: int, values: dict[str, float], table: str, prefix: str = "") -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending += [Metric(prefix + k, float(v), now, step) for k, v in values.items()]
        path, columns = self._tsv[table]
        with open(path, "a") as fh:
            fh.write("\t".join([str(step), *(_fmt(values.get(c)) for c in columns)]) + "\n")

    def flush(self) -> None:
        if not self.enabled or not self._pending or self._mlflow is None:
            return
        from mlflow import MlflowClient

        MlflowClient().log_batch(self.run_id, metrics=self._pending)
        self._pending = []

    def log_metrics(self, values: dict[str, float], step: int | None = None) -> None:
        if self.enabled and self._mlflow is not None:
            self._mlflow.log_metrics({k: float(v) for k, v in values.items()}, step=step)

    # ------------------------------------------------------------------ files
    def log_image(self, image, name: str) -> None:
        """A sample grid: saved under <out>/samples/ and logged to the run."""
        if not self.enabled:
            return
        path = self.out / "samples" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        if self._mlflow is not None:
            self._mlflow.log_artifact(str(path), artifact_path="samples")

    def log_artifacts(self, local: Path, artifact_path: str) -> None:
        if self.enabled and self._mlflow is not None:
            self._mlflow.log_artifacts(str(local), artifact_path=artifact_path)

    def write_metrics(self, metrics: dict[str, float]) -> Path | None:
        if not self.enabled:
            return None
        path = self.out / "metrics.json"
        tmp = path.with_name(".metrics.json.tmp")
        tmp.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
        self.log_metrics({f"final/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
        if self._mlflow is not None:
            self._mlflow.log_artifact(str(path))
        return path


def _param_value(v: Any) -> str:
    text = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    return text[:6000]


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{float(v):.9g}"
