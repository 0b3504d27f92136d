# Two commands do everything: `make demo` (the main job end to end) and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export PIP_DISABLE_PIP_VERSION_CHECK=1

.PHONY: setup test demo browser clean

setup: $(STAMP)

# torch is pinned first: this CPU wheel lies on disk; an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[all,dev]"
	touch $(STAMP)

# Headless Chromium for the one real-browser test of the app (Debian packages).
browser:
	@command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || \
	  { (apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null) || \
	    echo "warning: could not install chromium; the browser test will fail with a clear message"; }

test: setup browser
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q tests

demo: setup
	$(BIN)/fvl demo --out runs/demo

clean:
	rm -rf runs/ .pytest_cache
