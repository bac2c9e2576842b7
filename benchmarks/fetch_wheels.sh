#!/usr/bin/env bash
# Download the wheels the offline GPU machine lacks into .whl/ (CPython 3.12, manylinux x86-64):
#   bash benchmarks/fetch_wheels.sh [REQUIREMENTS [DIR]]  (DIR default .whl; REQUIREMENTS default
#                                                         benchmarks/requirements-gpu.txt; the GPU check of the
#                                                         real CLI: benchmarks/requirements-gpu-check.txt)
# Lines marked "# sdist" are fetched as source (DeepSpeed ships no wheel; it is built on the GPU machine, against
# its torch); lines marked "# build" are built into a wheel here (`pip wheel --no-deps`: DeepSpeed builds a pure-Python
# wheel with no prebuilt ops, which compiles its ops on first use on the GPU machine, so run_gpu.sh can install it
# like the others). Run where PyPI is reachable, in the project's venv (preparing an sdist's metadata imports torch);
# DIR is git-ignored via .git/info/exclude (the GPU test-bed recipe: requirements-gpu-train.txt .whl-train).
set -euo pipefail
cd "$(dirname "$0")/.."
REQ="${1:-benchmarks/requirements-gpu.txt}"
DEST="${2:-.whl}"
mkdir -p "$DEST"
grep -qx "/$DEST/" .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo "/$DEST/" >> .git/info/exclude; }
BIN=$(mktemp); SRC=$(mktemp); BLD=$(mktemp)
grep -v -e '# sdist' -e '# build' "$REQ" > "$BIN" || true
grep '# sdist' "$REQ" | sed 's/#.*//' > "$SRC" || true
grep '# build' "$REQ" | sed 's/#.*//' > "$BLD" || true
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DEST" -r "$BIN"
if [ -s "$SRC" ]; then
  python3 -m pip download -q --no-deps --no-binary=:all: --no-build-isolation -d "$DEST" -r "$SRC"
fi
if [ -s "$BLD" ]; then
  python3 -m pip wheel -q --no-deps -w "$DEST" -r "$BLD"
fi
rm -f "$BIN" "$SRC" "$BLD"
ls -1 "$DEST"
du -sh "$DEST"   # what travels with each device call (64 MiB at most, the working tree included)
