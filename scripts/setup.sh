#!/usr/bin/env bash
# Create a virtual environment and install subroutine-circuits with its dev extra.
# torch is installed first, pinned, so that pip never resolves a multi-GB CUDA build by accident;
# override with TORCH_SPEC (e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu124").
# TransformerLens is installed next, as TL_SPEC says: the default is the latest 4.x (what an
# unpinned `pip install` gives today; presets run on this library's NativeTransformer, Hugging
# Face folders on TransformerBridge); TL_SPEC="transformer-lens>=3.9,<4" gives 3.9
# (HookedTransformer, HookedEncoder). Both run the whole library and the whole test suite.
# VENV names the environment folder (default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
TL_SPEC="${TL_SPEC:-transformer-lens>=4,<5}"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# shellcheck disable=SC2086
"$VENV/bin/python" -m pip install -q $TORCH_SPEC
"$VENV/bin/python" -m pip install -q "$TL_SPEC"
"$VENV/bin/python" -m pip install -q -e '.[dev]'
echo "ready: $VENV/bin/subroutine-circuits --help ($("$VENV/bin/python" -c 'import importlib.metadata as m; print("transformer-lens", m.version("transformer-lens"))'))"
