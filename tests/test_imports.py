"""Imports flow one way: no module of the package imports, even lazily inside a function, a module that imports it
back (directly or through others). Registries live in the module that uses them (e.g. `convert.CONV_BLOCKS`),
not in the blocks they list. Package `__init__` re-exports are not edges (a package imports its submodules)."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fusedres"


def _modules() -> dict[str, set[str]]:
    mods = {}
    for f in PACKAGE.rglob("*.py"):
        parts = f.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        mods[name] = {d for d in deps if d.split(".")[0] == "fusedres"}
    return mods


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    packages = {m for m in mods if (PACKAGE.parent / m.replace(".", "/") / "__init__.py").exists()}

    def module_of(name):
        while name not in mods and "." in name:
            name = name.rsplit(".", 1)[0]
        return name if name in mods else None

    return {m: {t for t in map(module_of, deps) if t and t != m and t not in packages} for m, deps in mods.items()}


def _cycle(graph) -> list[str] | None:
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == "open":
                return stack[stack.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        state[m] = "done"
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycles():
    graph = _graph()
    assert "fusedres.nn.conv_blocks" in graph["fusedres.convert"]  # the graph sees real edges
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_check_finds_a_cycle():
    graph = _graph()
    graph["fusedres.nn.blocks"] = graph["fusedres.nn.blocks"] | {"fusedres.convert"}
    assert _cycle(graph) is not None
