# Convenience targets; the README's commands use scripts/setup.sh and .venv directly.
VENV ?= .venv

.PHONY: setup test lint format demo

setup:
	./scripts/setup.sh

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
