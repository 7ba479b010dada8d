# Set-up and everyday commands. `make setup` creates .venv and installs the CPU build of torch
# before anything that depends on it (a plain `torch` requirement can pull a multi-GB CUDA build).
PY ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0

.PHONY: setup test lint format demo

setup:
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q $(TORCH)
	$(VENV)/bin/pip install -q -e '.[dev]'

test:
	$(VENV)/bin/python -m pytest tests

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format:
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

demo:
	$(VENV)/bin/subroutine-circuits demo --out out/demo
