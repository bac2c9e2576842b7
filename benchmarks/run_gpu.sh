#!/usr/bin/env bash
# The documented benchmark command on an offline GPU machine (docs/benchmarks.md):
#   bash benchmarks/run_gpu.sh [extra benchmarks.run options]
# Installs the carried wheels (.whl/, see fetch_wheels.sh) into a private target dir, then runs
# every section; results go to $OUT (if set) or benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-benchmarks/results}"
mkdir -p "$OUT_DIR"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/dynamicid-site .whl/*.whl
  export PYTHONPATH="/tmp/dynamicid-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python3 -m benchmarks.run --out "$OUT_DIR" "$@" 2>&1 | tee "$OUT_DIR/log.txt"
