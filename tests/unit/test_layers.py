"""The package's layers, read from its source with ``ast``.

The pure model imports no MPI, no ops and no communicator; no module imports itself back
through others.

Imports under ``if TYPE_CHECKING:`` are annotations only and do not count; imports inside
functions do (they run). Importing ``a.b.c`` also runs the packages ``a.b`` and ``a``, so the
layer check follows those too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import mc2sim

ROOT = Path(mc2sim.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in ROOT.rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path, name: str) -> set[str]:
    """Every module ``path`` imports at run time (absolute names, submodules resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for branch in node.orelse:
                visit(branch)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            for alias in node.names:
                if f"{base}.{alias.name}" in MODULES:
                    found.add(f"{base}.{alias.name}")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


GRAPH = {name: _imports(path, name) for name, path in MODULES.items()}


def _reached(start: str) -> set[str]:
    """Every module that importing ``start`` runs (parent packages included)."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))
        todo.extend(GRAPH.get(name, ()))
    return seen


PURE_MODEL = sorted(name for name in MODULES if name.startswith("mc2sim.model"))


def test_the_walker_sees_the_imports_it_must() -> None:
    # an oracle for the walker itself: known edges of the code, TYPE_CHECKING ones left out
    assert "mc2sim.model.simulator" in GRAPH["mc2sim.model.fit"]
    assert "mc2sim.comm.base" not in GRAPH["mc2sim.timeline"]  # annotations only
    assert "mc2sim.ops" in _reached("mc2sim.study.measure")
    assert "mpi4py" in _reached("mc2sim.comm.mpi")


@pytest.mark.parametrize("module", PURE_MODEL)
def test_the_pure_model_imports_no_mpi_no_ops_no_communicator(module: str) -> None:
    bad = sorted(
        m
        for m in _reached(module)
        if m.split(".")[0] == "mpi4py"
        or m == "mc2sim.ops"
        or m.startswith(("mc2sim.ops.", "mc2sim.comm"))
    )
    assert bad == [], f"{module} imports {bad}"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each import cycle found by a depth-first walk, as the modules along it."""
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def walk(name: str) -> None:
        state[name] = 1
        stack.append(name)
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                cycles.append([*stack[stack.index(dep) :], dep])
            elif dep not in state:
                walk(dep)
        stack.pop()
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            walk(name)
    return cycles


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_package_has_no_import_cycle() -> None:
    inner = {name: {m for m in deps if m in MODULES and m != name} for name, deps in GRAPH.items()}
    assert _cycles(inner) == []


def test_nothing_of_mc2sim_imports_the_adapters() -> None:
    # third-party adapters are loaded by `mc2sim check --impl` alone, never by the package
    users = sorted(
        name
        for name, deps in GRAPH.items()
        if not name.startswith("mc2sim.adapters")
        and any(d.startswith("mc2sim.adapters") for d in deps)
    )
    assert users == []
    assert "mc2sim.comm" in _reached("mc2sim.adapters.symm_mem")  # the walker sees them
