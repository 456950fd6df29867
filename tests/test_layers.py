"""The package's layers hold: every import (lazy ones inside functions too) is parsed and
checked against the house rules.

core (numpy/scipy/numba math) <- engine (Dask over zarr) <- histo <- io / tl / pl /
datasets / metrics <- cli, with ``errors`` and ``tables`` below them all. A module imports
only its own layer or lower ones, never a private name of another package, and there is
no import loop between modules. torch is imported under ``histo`` only.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dflashdeconv"

#: Layer of each top-level part of the package: lower numbers are imported by higher ones
#: ('' is the package's own __init__, whose lazy __getattr__ exposes the namespaces).
LAYERS = {"errors": 0, "tables": 0, "log": 0, "core": 1, "engine": 2, "histo": 3, "io": 4, "tl": 4,
          "pl": 4, "datasets": 4, "metrics": 4, "cli": 5, "": 6}
#: What core may import besides itself and the standard library: it is math only.
CORE_THIRD_PARTY = {"numpy", "scipy", "numba", "sklearn"}


def package_modules(root: Path = PACKAGE) -> dict[str, str]:
    """Module name -> source text of every module of the package."""
    out = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path.read_text()
    return out


def imports(modules: dict[str, str]):
    """``(module, imported module, imported names, line)`` for every import statement."""
    for name, source in modules.items():
        tree = ast.parse(source)
        is_package = any(other.startswith(name + ".") for other in modules)
        package = name if is_package else name.rsplit(".", 1)[0]
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield name, alias.name, [], node.lineno
            elif isinstance(node, ast.ImportFrom):
                target = node.module or ""
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                names = [a.name for a in node.names]
                for n in [n for n in names if f"{target}.{n}" in modules]:
                    yield name, f"{target}.{n}", [], node.lineno  # "from pkg import module"
                rest = [n for n in names if f"{target}.{n}" not in modules]
                if rest:
                    yield name, target, rest, node.lineno


def part(module: str) -> str:
    """Top-level part of the package a module belongs to ('' for the package itself)."""
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else ""


def internal(modules):
    return [(s, t, n, line) for s, t, n, line in imports(modules)
            if t == "dflashdeconv" or t.startswith("dflashdeconv.")]


def upward_imports(modules) -> list[str]:
    return [f"{s}:{line} imports {t}" for s, t, _, line in internal(modules)
            if part(s) != part(t) and LAYERS[part(t)] > LAYERS[part(s)]]


def private_imports(modules) -> list[str]:
    wrong = []
    for s, t, names, line in internal(modules):
        if part(s) == part(t):
            continue
        private = [n for n in names if n.startswith("_")]
        if private or any(piece.startswith("_") for piece in t.split(".")):
            wrong.append(f"{s}:{line} imports {private or t}")
    return wrong


def import_loops(modules) -> list[str]:
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for s, t, _, _ in internal(modules):
        if t in modules and t != s and not s.startswith(t + "."):
            graph[s].add(t)  # a module importing its own parent package is no loop
    loops, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                loops.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return loops


def misplaced_third_party(modules) -> list[str]:
    import sys

    wrong = []
    for s, t, _, line in imports(modules):
        top = t.split(".")[0]
        if top == "torch" and part(s) != "histo":
            wrong.append(f"{s}:{line} imports torch")
        if (part(s) == "core" and top not in ("", "dflashdeconv") and top not in CORE_THIRD_PARTY
                and top not in sys.stdlib_module_names):
            wrong.append(f"{s}:{line} imports {t} into core")
    return wrong


MODULES = package_modules()


def test_every_import_respects_the_layers():
    assert upward_imports(MODULES) == []


def test_no_private_import_across_packages():
    assert private_imports(MODULES) == []


def test_no_import_loops():
    assert import_loops(MODULES) == []


def test_torch_only_under_histo_and_core_is_math_only():
    assert misplaced_third_party(MODULES) == []


def test_the_checks_catch_what_they_are_for():
    fake = dict(MODULES)
    fake["dflashdeconv.core.upward"] = "def f():\n    from ..tl import deconvolve\n"
    fake["dflashdeconv.histo.leaky"] = "from ..engine.store import _private\nfrom . import looping\n"
    fake["dflashdeconv.histo.looping"] = "from .leaky import thing\n"
    fake["dflashdeconv.core.heavy"] = "import dask.array\n"
    fake["dflashdeconv.engine.torchy"] = "import torch\n"
    assert upward_imports(fake) == ["dflashdeconv.core.upward:2 imports dflashdeconv.tl"]
    assert private_imports(fake) == ["dflashdeconv.histo.leaky:1 imports ['_private']"]
    assert import_loops(fake) == ["dflashdeconv.histo.leaky -> dflashdeconv.histo.looping "
                                  "-> dflashdeconv.histo.leaky"]
    assert sorted(misplaced_third_party(fake)) == [
        "dflashdeconv.core.heavy:1 imports dask.array into core",
        "dflashdeconv.engine.torchy:1 imports torch"]
