"""The notebook demo runs top to bottom (at its quick sizes), prints a verdict, and imports
nothing but the public API."""

from __future__ import annotations

import ast
import runpy
from pathlib import Path

DEMO = Path(__file__).resolve().parents[1] / "demos" / "notebook_demo.py"


def test_notebook_demo_imports_only_the_public_api():
    tree = ast.parse(DEMO.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.module in (None, "subroutine_circuits") or not node.module.startswith(
                "subroutine_circuits"
            ), node.module
        if isinstance(node, ast.Import):
            for a in node.names:
                assert not a.name.startswith("subroutine_circuits."), a.name


def test_notebook_demo_runs(capsys, monkeypatch):
    monkeypatch.setenv("SC_DEMO_QUICK", "1")
    runpy.run_path(str(DEMO), run_name="__main__")
    out = capsys.readouterr().out
    assert "compositional:" in out
    assert "activation" in out and "attribution" in out
