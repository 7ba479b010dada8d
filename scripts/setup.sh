#!/usr/bin/env bash
# Create .venv and install subroutine-circuits with its dev extra.
# torch is installed first, pinned, so that pip never resolves a multi-GB CUDA build by accident;
# override with TORCH_SPEC (e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu124").
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# shellcheck disable=SC2086
"$VENV/bin/python" -m pip install -q $TORCH_SPEC
"$VENV/bin/python" -m pip install -q -e '.[dev]'
echo "ready: $VENV/bin/subroutine-circuits --help"
