# Two entry points that work on a fresh machine (Python 3.11, no GPU, package registries only):
#   make run   installs into .venv, then runs the whole chain with `dvc repro` (embedded tiny profile)
#   make test  installs into .venv, then runs the whole test suite (and, as root on Debian, apt-installs
#              the headless browser its playground test drives: chromium + chromium-driver, once)
# torch is installed first with pip (on a CPU machine that takes the local CPU wheel), then
# everything else is resolved by uv with torch held at that version, so no CUDA wheels are pulled.

PYTHON ?= python3.11
VENV   ?= .venv
TORCH  ?= torch==2.13.0
EXTRAS ?= all
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed-$(EXTRAS)

.PHONY: install run test lint clean browser

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

# The playground's browser test (tests/test_serving_playground.py) drives Debian's chromium through its
# chromedriver. Nothing to do where both are on PATH; as root with apt-get (a clean CI machine) they are
# installed quietly (apt's output goes to $(VENV)/apt-browser.log, shown only on failure); otherwise the
# target says what to install and fails, so the test never silently goes missing.
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing chromium and chromium-driver (apt) for the browser test"; mkdir -p $(VENV); \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } \
	      > $(VENV)/apt-browser.log 2>&1 || { tail -n 30 $(VENV)/apt-browser.log >&2; exit 1; }; \
	  else \
	    echo "the browser test needs chromium and chromedriver: as root, apt-get install -y chromium chromium-driver" >&2; \
	    exit 1; \
	  fi; \
	fi

test: install browser
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
