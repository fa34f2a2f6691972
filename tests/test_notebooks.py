"""The tutorial notebooks as documents: all there, prose between the code, no logic of their own, committed clean.

`make test` executes every notebook top to bottom with nbmake (`pytest --nbmake notebooks`); these checks
cover what execution cannot: that a notebook teaches (markdown around every figure) and only calls the library.
"""
import ast
import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ["01_quickstart", "02_error_sources", "03_calibration_selection", "04_distillation",
             "05_mixed_precision", "06_export_and_speed", "07_real_pipelines"]
# modules a notebook may import besides workbench: display helpers, the standard library's plumbing, and
# torch itself (thread settings; users of a real pipeline drive torch anyway)
ALLOWED_IMPORTS = {"IPython.display", "copy", "tempfile", "pathlib", "torch"}


def _load(name):
    return nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)


def test_every_tutorial_is_there_and_executed_by_make_test():
    assert sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb")) == NOTEBOOKS
    make = (ROOT / "Makefile").read_text()
    assert re.search(r"pytest .*notebooks .*--nbmake", make), "make test must execute the notebooks with nbmake"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_teaches_and_holds_no_logic(name):
    nb = _load(name)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    md = [c for c in nb.cells if c.cell_type == "markdown"]
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith(f"# {name[:2]}")
    assert sum(len(c.source.split()) for c in md) >= 300, "explain the method and what to look for"
    assert len(md) >= len(code) // 2
    for c in code:
        assert not c.outputs and c.execution_count is None, "commit notebooks without outputs"
        tree = ast.parse(c.source)
        for node in ast.walk(tree):
            assert not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda,
                                         ast.For, ast.While)), f"logic in a notebook cell:\n{c.source}"
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                for m in mods:
                    assert m.split(".")[0] == "workbench" or m in ALLOWED_IMPORTS, f"{name} imports {m}"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_figures_are_introduced_by_prose(name):
    """Each code cell that shows a figure follows a markdown cell within two cells (what to look for)."""
    cells = _load(name).cells
    for i, c in enumerate(cells):
        if c.cell_type == "code" and re.search(r"^\s*figure\(|layer_error_figure\(", c.source, re.M):
            assert any(cells[j].cell_type == "markdown" for j in range(max(0, i - 2), i)), c.source
