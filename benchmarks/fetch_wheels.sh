#!/usr/bin/env bash
# Download the wheels the offline GPU machine lacks (benchmarks/requirements-gpu.txt) into .whl/
# (CPython 3.12, manylinux x86-64). Run where PyPI is reachable; .whl/ is git-ignored via .git/info/exclude.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.whl/' >> .git/info/exclude; }
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl -r benchmarks/requirements-gpu.txt
ls -1 .whl
