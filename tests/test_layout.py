"""The package is laid out by layer: no import cycle, no upward import, no private name across modules.

Layers, bottom to top (docs/ARCHITECTURE.md): the core bindings, ops and data helpers; ``method``;
``sites``; ``models``; ``growth``; ``experiments``; the CLI and the package's own ``__init__``.
A module may import from its own layer or below. Every import statement counts, including the
ones inside functions (a lazy import would hide a cycle, not remove it). The source is read with
``ast`` from the installed package's files, so the test sees exactly what ships.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

import topoderiv

ROOT = Path(topoderiv.__file__).resolve().parent
PKG = "topoderiv"

LAYERS: Dict[str, int] = {
    "topoderiv._lib": 0,
    "topoderiv._C": 0,
    "topoderiv.ops": 0,
    "topoderiv.reference": 0,
    "topoderiv.data": 0,
    "topoderiv.registry": 0,
    "topoderiv.method": 1,
    "topoderiv.sites": 2,
    "topoderiv.models": 3,
    "topoderiv.growth": 4,
    "topoderiv.experiments": 5,
    "topoderiv.cli": 6,
    "topoderiv.__main__": 6,
    "topoderiv": 7,  # the package's __init__ re-exports everything
}


def _modules() -> Dict[str, Path]:
    out = {}
    for f in ROOT.rglob("*.py"):
        rel = f.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


MODULES = _modules()
MODULES["topoderiv._C"] = ROOT / "_C.pyi"  # the compiled extension (its stub stands in for the source)


def _layer(mod: str) -> int:
    best, best_len = None, -1
    for prefix, layer in LAYERS.items():
        if (mod == prefix or mod.startswith(prefix + ".")) and len(prefix) > best_len:
            best, best_len = layer, len(prefix)
    assert best is not None, f"module {mod} has no layer: add it to LAYERS"
    return best


def _is_package(mod: str) -> bool:
    return MODULES[mod].name == "__init__.py"


def _imports(mod: str) -> List[Tuple[str, List[str], int]]:
    """``(imported module, names imported from it, line)`` for every internal import of ``mod``."""
    if mod == "topoderiv._C":
        return []
    tree = ast.parse(MODULES[mod].read_text(), filename=str(MODULES[mod]))
    base = mod.split(".") if _is_package(mod) else mod.split(".")[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == PKG or a.name.startswith(PKG + "."):
                    out.append((a.name, [], node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                target = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not (target == PKG or target.startswith(PKG + ".")):
                continue
            names = [a.name for a in node.names]
            subs = [n for n in names if f"{target}.{n}" in MODULES]
            for n in subs:  # `from pkg import submodule`
                out.append((f"{target}.{n}", [], node.lineno))
            rest = [n for n in names if n not in subs]
            if rest or not subs:
                out.append((target, rest, node.lineno))
    return out


def _graph() -> Dict[str, Set[str]]:
    return {m: {t for t, _, _ in _imports(m) if t in MODULES and t != m} for m in MODULES}


def test_every_module_has_a_layer():
    for m in MODULES:
        _layer(m)


def test_no_upward_imports():
    bad = []
    for m in MODULES:
        for target, _, line in _imports(m):
            if target == PKG and m != PKG:
                bad.append(f"{m}:{line} imports the top-level package (import the module it needs)")
            elif _layer(target) > _layer(m):
                bad.append(f"{m}:{line} (layer {_layer(m)}) imports {target} (layer {_layer(target)})")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def find_cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    sccs: List[List[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
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
                sccs.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sccs


def test_no_import_cycles():
    cycles = find_cycles(_graph())
    assert not cycles, f"import cycles: {cycles}"


def test_no_private_names_across_modules():
    bad = []
    for m in MODULES:
        for target, names, line in _imports(m):
            for n in names:
                if n.startswith("_") and not n.startswith("__") and target != m:
                    bad.append(f"{m}:{line} imports {n} from {target}")
    # the extension loader is the one sanctioned exception: `_lib` is the module name, not a symbol
    assert not bad, "private names used across modules:\n" + "\n".join(bad)


def test_the_checks_can_fail(monkeypatch):
    """The checks see real violations: a fake cycle, and a layer table that makes an import upward."""
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []
    monkeypatch.setitem(LAYERS, "topoderiv.method", 9)
    with pytest.raises(AssertionError, match="upward imports"):
        test_no_upward_imports()
