#!/usr/bin/env bash
# Download the wheels the offline GPU machine lacks into .whl/ (CPython 3.12, manylinux x86-64):
#   bash benchmarks/fetch_wheels.sh [REQUIREMENTS]     (default benchmarks/requirements-gpu.txt; the GPU check of the
#                                                       real CLI: benchmarks/requirements-gpu-check.txt)
# Lines marked "# sdist" are fetched as source (DeepSpeed ships no wheel; it is built on the GPU machine, against
# its torch). Run where PyPI is reachable, in the project's venv (preparing an sdist's metadata imports torch);
# .whl/ is git-ignored via .git/info/exclude.
set -euo pipefail
cd "$(dirname "$0")/.."
REQ="${1:-benchmarks/requirements-gpu.txt}"
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.whl/' >> .git/info/exclude; }
BIN=$(mktemp); SRC=$(mktemp)
grep -v '# sdist' "$REQ" > "$BIN" || true
grep '# sdist' "$REQ" | sed 's/#.*//' > "$SRC" || true
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl -r "$BIN"
if [ -s "$SRC" ]; then
  python3 -m pip download -q --no-deps --no-binary=:all: --no-build-isolation -d .whl -r "$SRC"
fi
rm -f "$BIN" "$SRC"
ls -1 .whl
du -sh .whl   # what travels with each device call (64 MiB at most, the working tree included)
