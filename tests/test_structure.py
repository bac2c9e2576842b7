"""The house plan, enforced: imports flow model <- components.core <- stages <- drivers, with no cycle
between files or packages; modules stay small and say what they hold."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import import_graph as g

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 450
# Modules allowed over MAX_LINES, each with the reason it is one module.
LONG_MODULES: dict[str, str] = {}


def test_no_import_points_to_a_higher_layer():
    graph = g.imports(ROOT)
    assert len(graph) > 50, "the walk found too few modules to be the project"
    assert g.back_edges(graph) == []


def test_no_cycle_between_files_or_packages():
    graph = g.imports(ROOT)
    assert g.cycles(graph) == []
    assert g.cycles(g.package_graph(graph)) == []


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_checker_finds_a_back_edge_and_cycles(tmp_path):
    """The rule is real: the same walk over a small tree with a lower layer importing a stage, and two
    stages importing each other (one of them inside a function), reports exactly those."""
    root = _tree(tmp_path, {
        "model/__init__.py": "", "model/unet.py": "from components.evaluate import metrics\n",
        "components/__init__.py": "", "components/core/__init__.py": "",
        "components/core/config.py": "import model.unet\n",
        "components/evaluate/__init__.py": "", "components/evaluate/metrics.py": "X = 1\n",
        "components/evaluate/stage.py": "def f():\n    from components.register.stage import g\n",
        "components/register/__init__.py": "",
        "components/register/stage.py": "from ..evaluate.stage import f\n\ndef g():\n    pass\n",
        "pipelines/__init__.py": "", "serving/__init__.py": "",
    })
    graph = g.imports(root)
    assert g.back_edges(graph) == [("model.unet", "components.evaluate.metrics")]
    assert g.cycles(graph) == [["components.evaluate.stage", "components.register.stage"]]
    assert ["components.evaluate", "components.register"] in g.cycles(g.package_graph(graph))


def _modules() -> list[Path]:
    return sorted(p for pkg in g.PACKAGES for p in (ROOT / pkg).rglob("*.py"))


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_module_is_small_and_says_what_it_holds(path):
    rel = str(path.relative_to(ROOT))
    text = path.read_text()
    lines = text.count("\n")
    if rel not in LONG_MODULES:
        assert lines <= MAX_LINES, f"{rel}: {lines} lines; split it by job (or give the reason in LONG_MODULES)"
    if path.name != "__init__.py" or text.strip():
        doc = ast.get_docstring(ast.parse(text))
        assert doc and doc.strip(), f"{rel}: no module docstring saying what it holds"
