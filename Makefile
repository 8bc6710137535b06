# Two commands, both idempotent: `make demo` (set up + open the demo notebook in JupyterLab on 127.0.0.1)
# and `make test` (set up + lint + the whole test suite, browser and notebook tests included).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.layerscope-installed

.PHONY: demo test lint bench chromium

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[bench]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/jupyter lab --ip=127.0.0.1 notebooks/01_squeezenet_tour.ipynb

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks notebooks

# The widget tests drive Debian's Chromium (Playwright's own browser download does not work offline).
chromium:
	@command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

test: $(STAMP) lint chromium
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/bench_capture.py
