"""The notebook of issue 24 (demos/your_prompts.ipynb) runs top to bottom in a kernel, imports
nothing but the public API, and its public-API lines are the README's "From a notebook"
section."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "demos" / "your_prompts.ipynb"


def _code(nb) -> str:
    return "\n".join(c.source for c in nb.cells if c.cell_type == "code")


def test_notebook_imports_only_the_public_api():
    tree = ast.parse(_code(nbformat.read(NOTEBOOK, as_version=4)))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            assert not node.module.startswith("subroutine_circuits."), node.module
        if isinstance(node, ast.Import):
            assert not any(a.name.startswith("subroutine_circuits.") for a in node.names)


def test_readme_section_is_the_notebooks_lines():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## From a notebook: your prompts, your metric", 1)[1]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    lines = [ln.strip() for ln in block.splitlines() if ln.strip() and not ln.startswith("#")]
    code = _code(nbformat.read(NOTEBOOK, as_version=4))
    assert len(lines) >= 6
    for line in lines:
        assert line.split("  #")[0].strip() in code, line


def test_notebook_runs(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]  # fmt: skip
    assert not errors
    text = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )
    assert "circuit.json read back" in text
    assert (tmp_path / "circuit.json").exists()
