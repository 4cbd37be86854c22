"""The package is layered and acyclic: base < io < data < fit < embed < register < bench < cli.

Every import of a regsam module is counted, at the top of a file or inside a function (a lazy import
hides a cycle from Python, not from this test), including ``TYPE_CHECKING`` blocks.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "regsam"

#: layer of each top-level part of the package, lowest first; a module may import its own layer and lower ones
LAYERS = ("base", "io", "data", "fit", "embed", "register", "bench", "cli")
PART_LAYER = {"io": "io", "data": "data", "fit": "fit", "embed": "embed", "register": "register", "bench": "bench", "cli": "cli"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> str:
    """``regsam.register.sam`` -> ``register``; ``regsam``, ``regsam.errors``, ``regsam.devices``, ``regsam.util`` -> ``base``."""
    parts = module.split(".")
    return PART_LAYER.get(parts[1], "base") if len(parts) > 1 else "base"


def _resolve(module: str, level: int, importer: str, is_package: bool) -> str:
    if level == 0:
        return module
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def imports_of(name: str, path: Path) -> list[tuple[str, int]]:
    """``(imported regsam module, line)`` for every import statement in the file, wherever it stands."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = _resolve(node.module or "", node.level, name, path.name == "__init__.py")
            # ``from regsam.register import sam`` imports the module regsam.register.sam
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in MODULES else module for a in node.names]
        else:
            continue
        out += [(t, node.lineno) for t in targets if t == "regsam" or t.startswith("regsam.")]
    return out


GRAPH = {name: imports_of(name, path) for name, path in MODULES.items()}


def test_the_package_has_modules_in_every_layer():
    assert {layer_of(m) for m in MODULES} == set(LAYERS)


def test_no_module_imports_a_higher_layer():
    wrong = [
        f"{MODULES[name].relative_to(PACKAGE.parent)}:{line}: {name} ({layer_of(name)}) imports {target} ({layer_of(target)})"
        for name, edges in GRAPH.items()
        for target, line in edges
        if LAYERS.index(layer_of(target)) > LAYERS.index(layer_of(name))
    ]
    assert not wrong, "imports against the layer order " + " < ".join(LAYERS) + ":\n" + "\n".join(wrong)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), or a module importing itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    # a module importing its own package's (empty) __init__ is no cycle: Python imports the parent first anyway
    graph = {
        name: {t for t, _ in edges if t in MODULES and not (name.startswith(t + ".") and MODULES[t].name == "__init__.py")}
        for name, edges in GRAPH.items()
    }
    cycles = _cycles(graph)
    assert not cycles, "import cycles (lazy imports included):\n" + "\n".join(" <-> ".join(c) for c in cycles)


@pytest.mark.parametrize(
    "graph, expected",
    [({"a": {"b"}, "b": {"a"}, "c": {"a"}}, [["a", "b"]]), ({"a": {"b"}, "b": {"c"}, "c": set()}, []), ({"a": {"a"}}, [["a"]])],
)
def test_cycle_finder(graph, expected):
    assert _cycles(graph) == expected


def test_layer_map():
    assert layer_of("regsam") == layer_of("regsam.errors") == layer_of("regsam.devices") == "base"
    assert layer_of("regsam.fit.smooth") == "fit" and layer_of("regsam.cli") == "cli"
    assert _resolve("sam", 1, "regsam.register.api", False) == "regsam.register.sam"
    assert _resolve("", 2, "regsam.embed.objectives.sam", False) == "regsam.embed"
