# Two commands do everything, set-up included:
#   make book   builds the HTML book into _build/html
#   make test   runs every test (notebooks, unit tests, the book build, a real browser)
#   make test-fast  the unit and property tests only (no processes, notebooks, book build or browser): about a minute
#   make lint   ruff's lint and format checks (make test and make test-fast run them too, tests/test_lint.py)
#   make test-portable  re-checks the notebooks' stored outputs under other kernels and thread counts
#   make lab    JupyterLab on the chapters, from .venv (as a user or as root)
# Both create .venv and install into it on first use.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# make setup TORCH=torch==2.5.1 picks another torch; the default is the CPU build pinned in constraints.txt.
TORCH  ?=

.PHONY: setup browser book test test-fast lint test-portable execute lab clean

setup: $(STAMP)

$(STAMP): requirements.txt constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -m pip install --quiet $(if $(TORCH),"$(TORCH)",-c constraints.txt) -r requirements.txt -e . 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -c "import torch, tputil, nbval, jupyter_book, playwright" 
	touch $@

# Debian's Chromium and a font, for the browser test (skipped when already there).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium fonts-dejavu-core >/dev/null; }
	@chromium --version

book: $(STAMP)
	$(BIN)/jupyter-book build . --all -W -n --keep-going
	@echo "Open _build/html/index.html in a browser."

test: $(STAMP) browser
	$(BIN)/python -m pytest

# tests/ without the tests marked `slow` (those that start processes or torchrun, build the book or
# drive the browser; the marker is registered in pyproject.toml). Under 90 seconds on 2 cores.
test-fast: $(STAMP)
	$(BIN)/python -m pytest tests -m "not slow"

# Both checks run, and either failing fails the target. `ruff format src tests examples tools` rewrites the files.
lint: $(STAMP)
	@status=0; \
	$(BIN)/ruff check src tests examples tools || status=1; \
	$(BIN)/ruff format --check src tests examples tools || status=1; \
	exit $$status

# The notebooks under strict nbval again, once per setting that changes how float sums are rounded:
# PyTorch's generic kernels, its AVX2 kernels, MKL's reproducible branch, and one thread. A stored
# output or an assertion that holds on this machine only fails here. PORTABLE=... picks the settings.
PORTABLE ?= ATEN_CPU_CAPABILITY=default ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=COMPATIBLE OMP_NUM_THREADS=1
test-portable: $(STAMP)
	@failed=""; for setting in $(PORTABLE); do \
	  echo "== the notebooks with $$setting"; \
	  env $$setting $(BIN)/python -m pytest book || failed="$$failed $$setting"; \
	done; \
	if [ -n "$$failed" ]; then echo "test-portable: failed with$$failed"; exit 1; fi; \
	echo "test-portable: passed with each of: $(PORTABLE)"

# Re-execute every chapter in place (stores outputs and widget state), after editing a notebook.
execute: $(STAMP)
	$(BIN)/python tools/execute_notebooks.py book/*.ipynb

# JupyterLab on the chapters. --allow-root only lifts JupyterLab's refusal to run as root; it
# changes nothing for other users. The server listens on 127.0.0.1 alone.
lab: $(STAMP)
	$(BIN)/jupyter lab --ip 127.0.0.1 --allow-root book/

clean:
	rm -rf _build
