"""The house rules of the code, checked on its source: layers, no import cycles, lazy imports only where they pay.

Imports inside functions count as edges: hiding a cycle in a function does not make it go away.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("engine", "harness", "scenarios")

# Lower layers never import higher ones (prefixes; the longest match decides).
LAYERS = {
    "engine.errors": 0, "engine.config": 0, "engine.policy": 0, "engine.markdown": 0,
    "engine.models": 1, "engine.quant": 1, "engine.storage": 1, "engine.placement": 1, "engine.sampling": 1,
    "engine.tables": 1, "engine.weights": 1, "engine.channel_keys": 1,
    "engine.memory": 2, "engine.runtime": 2, "engine.kv_cache": 2, "engine.schedule": 2,
    "engine.api": 3, "engine.generation": 3, "engine": 3,
    "engine.planner": 4,
    "engine.bench": 5, "engine.flags": 5, "engine.generate": 5, "engine.search": 5, "engine.profile": 5,
    "scenarios": 6, "harness": 7,
}
# Packages worth importing only when used: seconds to import, or optional at run time.
HEAVY = {"helm", "transformers", "lm_eval", "ray", "accelerate", "matplotlib", "nltk", "nbformat", "nbclient",
         "flexgen"}


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def imports(path: Path, known: set[str]) -> list[tuple[str, int, bool]]:
    """(imported project module, line, inside a function) for every import in the file."""
    tree = ast.parse(path.read_text())
    nested = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)
              for n in ast.walk(f) if n is not f}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                     for a in node.names]
        else:
            continue
        found += [(n, node.lineno, id(node) in nested) for n in names]
    return found


def layer(module: str) -> int:
    key = max((k for k in LAYERS if module == k or module.startswith(k + ".")), key=len)
    return LAYERS[key]


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: {n for n, _, _ in imports(p, set(mods)) if n in mods and n != m} for m, p in mods.items()}


def test_no_import_cycles() -> None:
    g, index, low, stack, on, cycles = graph(), {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g[v]:
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
                cycles.append(sorted(comp))

    for v in g:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_layers_point_down() -> None:
    bad = [f"{m} (layer {layer(m)}) imports {n} (layer {layer(n)})"
           for m, deps in graph().items() for n in deps if layer(n) > layer(m)]
    assert not bad, "\n".join(bad)


def test_engine_stands_alone() -> None:
    bad = [f"{p.relative_to(ROOT)}:{line} imports {n}" for m, p in modules().items() if m.startswith("engine")
           for n, line, _ in imports(p, set()) if n.split(".")[0] in ("harness", "scenarios", "helm")]
    assert not bad, "\n".join(bad)


def heavy_modules() -> set[str]:
    """Project modules that import a heavy package at import time, directly or through each other."""
    mods = modules()
    top = {m: {n for n, _, inner in imports(p, set(mods)) if not inner} for m, p in mods.items()}
    heavy = {m for m, deps in top.items() if any(n.split(".")[0] in HEAVY for n in deps)}
    while grown := {m for m, deps in top.items() if m not in heavy and deps & heavy}:
        heavy |= grown
    return heavy


def test_imports_inside_functions_only_defer_heavy_packages() -> None:
    mods, heavy = modules(), heavy_modules()
    bad = [f"{p.relative_to(ROOT)}:{line} imports {n} inside a function"
           for m, p in mods.items() for n, line, inner in imports(p, set(mods))
           if inner and n.split(".")[0] not in HEAVY and n not in heavy]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("module", sorted(modules()))
def test_modules_stay_small(module: str) -> None:
    lines = len(modules()[module].read_text().splitlines())
    assert lines <= 500, f"{module} has {lines} lines; split it by concern"
