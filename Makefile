# Two commands, both idempotent: `make demo` (set up + open the demo notebook in JupyterLab on 127.0.0.1)
# and `make test` (set up + lint + the whole test suite, browser and notebook tests included).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.layerscope-installed
DEMO_STAMP := $(VENV)/.layerscope-demo-installed
DEMO_NOTEBOOK := 01_squeezenet_tour.ipynb
# Extra JupyterLab flags for `make demo`, e.g. `make demo JUPYTER_ARGS="--port 9999"`.
JUPYTER_ARGS ?=
# Jupyter refuses to run as root without --allow-root. Without a display on Linux there is no browser to
# open (and Jupyter could start a text browser in the terminal instead), so it only prints the URL.
DEMO_FLAGS := $(strip $(if $(filter 0,$(shell id -u)),--allow-root) \
  $(if $(filter Linux,$(shell uname -s)),$(if $(DISPLAY)$(WAYLAND_DISPLAY),,--no-browser)))

FLOOR_VENV ?= .venv-floor
FLOOR_STAMP := $(FLOOR_VENV)/.layerscope-installed

.PHONY: demo test test-floor lint bench chromium

# $(call install,EXTRA[,VENV,CONSTRAINTS]): the venv (made again if it has no pip, e.g. after a failed first
# try without python3-venv) with layerscope and the given extra, pinned by constraints.txt.
define install
test -x $(or $(2),$(VENV))/bin/pip || $(PYTHON) -m venv $(or $(2),$(VENV))
$(or $(2),$(VENV))/bin/python -m pip install -q --upgrade pip
$(or $(2),$(VENV))/bin/python -m pip install -q -c $(or $(3),constraints.txt) -e ".[$(1)]"
endef

# Everything: the bench extra includes test, which includes demo.
$(STAMP): pyproject.toml constraints.txt
	$(call install,bench)
	touch $@

# Only what the demo needs. An up-to-date full install already has it, so then nothing is installed.
$(DEMO_STAMP): pyproject.toml constraints.txt
	$(if $(shell [ $(STAMP) -nt pyproject.toml ] && [ $(STAMP) -nt constraints.txt ] && echo fresh),,$(call install,demo))
	touch $@

demo: $(DEMO_STAMP)
	@echo "Starting JupyterLab with notebooks/$(DEMO_NOTEBOOK): open the http://127.0.0.1 URL it prints below."
	@echo "Ctrl-C twice stops it."
	$(VENV)/bin/jupyter lab --ip=127.0.0.1 --ServerApp.root_dir=notebooks \
	  --LabApp.default_url=/lab/tree/$(DEMO_NOTEBOOK) $(DEMO_FLAGS) $(JUPYTER_ARGS) notebooks/$(DEMO_NOTEBOOK)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks notebooks

# The widget tests drive Debian's Chromium (Playwright's own browser download does not work offline).
chromium:
	@command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

test: $(STAMP) lint chromium
	$(PY) -m pytest -q

# The oldest supported torch (constraints-floor.txt) in a second environment: every test but the browser,
# notebook and Binder ones, which stay on the pinned torch. CI runs it after `make test`.
$(FLOOR_STAMP): pyproject.toml constraints-floor.txt
	$(call install,test,$(FLOOR_VENV),constraints-floor.txt)
	touch $@

test-floor: $(FLOOR_STAMP)
	$(FLOOR_VENV)/bin/python -c "import torch; print('torch', torch.__version__)"
	$(FLOOR_VENV)/bin/python -m pytest -q -m "not browser" --ignore=tests/test_notebooks.py --ignore=tests/test_binder.py

bench: $(STAMP)
	$(PY) benchmarks/bench_capture.py
