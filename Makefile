# Two commands do everything, set-up included:
#   make book   builds the HTML book into _build/html
#   make test   runs every test (notebooks, unit tests, the book build, a real browser)
# Both create .venv and install into it on first use.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# make setup TORCH=torch==2.5.1 picks another torch; the default is the CPU build pinned in constraints.txt.
TORCH  ?=

.PHONY: setup browser book test execute clean

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

# Re-execute every chapter in place (stores outputs and widget state), after editing a notebook.
execute: $(STAMP)
	$(BIN)/python tools/execute_notebooks.py book/*.ipynb

clean:
	rm -rf _build
