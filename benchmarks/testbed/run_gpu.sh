#!/usr/bin/env bash
# The GPU test-bed recipe's training (issue 16), through the real CLI on one GPU: stage 1 (anchor) and stage 2
# (reconfigure) of the tiny profile from the stored pretrained base, with benchmarks/testbed/params-gpu.yaml.
# Evaluation runs afterwards on any machine, as the chain's does (docs/evaluation.md).
#
#   bash benchmarks/testbed/run_gpu.sh [-S key=value ...]     (extra overrides, e.g. -S data.prepared=DIR)
#   STAGES=anchor bash benchmarks/testbed/run_gpu.sh ...      (one stage per device call, each under its limit;
#   STAGES=reconfigure ... then needs runs/testbed-gpu/anchor carried back in)
#
# On the offline GPU machine, carry the prepared data and the wheels of benchmarks/requirements-gpu-train.txt in
# .whl-train/ (MLflow tracks to a file store there: mlflow-skinny has no SQL store). Results go to $OUT (or
# runs/testbed-gpu): train.log, times.txt, and per stage <name>.tar, <name> the stage directory's name (train.<stage>.
# output: anchor, reconfigure by default), with its export, metrics, losses and sample grids, packed as soon as the
# stage ends, before any diagnostic, so a call cut off by its time limit still returns the model (a 2026-12-05 call
# lost three stage-1 exports to a slow diagnostic); after stage 1, <name>.id_signal.json and
# <name>.id_signal_heldout.json (benchmarks/testbed/id_signal.py on trained and on held-out people).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT_DIR="${OUT:-runs/testbed-gpu}"
mkdir -p "$OUT_DIR"
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
if ! "$PY" -c "import diffusers, deepspeed, mlflow, pydantic" >/dev/null 2>&1 && compgen -G ".whl-train/*.whl" >/dev/null
then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/dynamicid-site .whl-train/*.whl
  export PYTHONPATH="/tmp/dynamicid-site${PYTHONPATH:+:$PYTHONPATH}"
  export MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-file:///tmp/dynamicid-mlruns}" MLFLOW_ALLOW_FILE_STORE=true
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
for stage in ${STAGES:-anchor reconfigure}; do
  start=$(date +%s)
  R=$("$PY" -m components.cli --params benchmarks/testbed/params-gpu.yaml "$@" params --section train --format json \
    | "$PY" -c "import json, sys; print(json.load(sys.stdin)['$stage']['output'])")  # the stage's directory
  "$PY" -m components.cli --params benchmarks/testbed/params-gpu.yaml "$@" train --stage "$stage" 2>&1 \
    | grep --line-buffered -v -e "it/s]" -e "s/it]" | tee -a "$OUT_DIR/train.log"
  echo "$stage $(( $(date +%s) - start )) s" | tee -a "$OUT_DIR/times.txt"
  name=$(basename "$R")
  tar -cf "$OUT_DIR/$name.tar" $(ls -d "$R/export" "$R/metrics.json" "$R/loss.tsv" "$R/samples" 2>/dev/null)
  if [ "$stage" = anchor ]; then  # does stage 1 carry identity? token spread and what the loss sees (CPU, ~1 min each)
    for split in train test; do
      "$PY" -m benchmarks.testbed.id_signal --checkpoint "$R/export" --params benchmarks/testbed/params-gpu.yaml \
        "$@" --split "$split" --people 10 --photos 4 --repeats 2 2>/dev/null \
        > "$OUT_DIR/$name.id_signal$([ "$split" = test ] && echo _heldout).json" || echo "id_signal ($split) failed" >&2
    done
  fi
done
"$PY" - <<'PY' | tee -a "$OUT_DIR/times.txt"
import torch
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "torch", torch.__version__)
PY
ls -la "$OUT_DIR"
