"""The project's import graph, read from the source with ``ast`` (nothing is imported), and the layering
rule it must follow: model <- components.core <- stages <- drivers (CLI, pipelines, serving)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGES = ("model", "components", "pipelines", "serving")
# Lower numbers are lower layers; a module may import its own layer or lower ones.
DRIVERS = ("components.cli", "components.params_cmd", "pipelines", "serving")


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _resolve(module: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """module -> the project modules it imports (module level, in functions and under TYPE_CHECKING alike)."""
    files = {module_name(root, p): p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(mod, path.name == "__init__.py", node)
                subs = [f"{base}.{a.name}" for a in node.names]
                # `from pkg import submodule` imports the submodule; `from pkg import name` the package
                names = subs + ([base] if any(s not in files for s in subs) else [])
            else:
                continue
            for name in names:
                # the longest project module that the name refers to (`from pkg import mod` names a module)
                while name and name not in files:
                    name = name.rpartition(".")[0]
                if name and name != mod:
                    targets.add(name)
        graph[mod] = targets
    return graph


def layer(module: str) -> int:
    if module == "model" or module.startswith("model."):
        return 0
    if module == "components.core" or module.startswith("components.core."):
        return 1
    if any(module == d or module.startswith(d + ".") for d in DRIVERS):
        return 3
    if module.startswith("components"):
        return 2
    return 4


def unit(module: str) -> str:
    """The package a module belongs to for the package-level cycle check: a subpackage of components, or the
    top-level package."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "components" and len(parts) > 1 else parts[0]


def back_edges(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((a, b) for a, targets in graph.items() for b in targets if layer(b) > layer(a))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    pkgs: dict[str, set[str]] = {}
    for a, targets in graph.items():
        pkgs.setdefault(unit(a), set()).update(unit(b) for b in targets if unit(b) != unit(a))
    return pkgs
