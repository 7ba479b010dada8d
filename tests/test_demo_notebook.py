"""The notebook demo runs top to bottom (at its quick sizes) and prints a verdict."""

from __future__ import annotations

import runpy
from pathlib import Path

DEMO = Path(__file__).resolve().parents[1] / "demos" / "notebook_demo.py"


def test_notebook_demo_runs(capsys, monkeypatch):
    monkeypatch.setenv("SC_DEMO_QUICK", "1")
    runpy.run_path(str(DEMO), run_name="__main__")
    out = capsys.readouterr().out
    assert "compositional:" in out
    assert "activation" in out and "attribution" in out
