# Two commands on a fresh machine: `make demo` (set up + search + ensemble on the sample data) and
# `make test` (set up + the test suite). Both create .venv from requirements.txt on first use and install
# the project into it (editable), the way Ray's trial workers import it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test clean-runs

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python launch.py
	$(BIN)/python ensemble_select.py --topk 5

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean-runs:
	rm -rf runs
