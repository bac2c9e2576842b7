# Two entry points that work on a fresh machine (Python 3.11, no GPU, package registries only):
#   make run   installs into .venv, then runs the whole chain with `dvc repro` (embedded tiny profile)
#   make test  installs into .venv, then runs the whole test suite
# torch is installed first with pip (on a CPU machine that takes the local CPU wheel), then
# everything else is resolved by uv with torch held at that version, so no CUDA wheels are pulled.

PYTHON ?= python3.11
VENV   ?= .venv
TORCH  ?= torch==2.13.0
EXTRAS ?= all
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed-$(EXTRAS)

.PHONY: install run test lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH)" uv
	$(BIN)/python -c "import torch; print('torch', torch.__version__)" > $(VENV)/torch-version.txt
	echo "$$($(BIN)/python -c 'import torch; print("torch==" + torch.__version__.split("+")[0])')" > $(VENV)/constraints.txt
	$(BIN)/uv pip install --compile-bytecode --python $(BIN)/python --constraint $(VENV)/constraints.txt -e ".[$(EXTRAS)]"
	@touch $@

run: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro
	$(BIN)/dynamicid summary

test: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
