"""The layout's promises, checked: short modules, a small top floor, no import cycles.

Read from the source with `ast` (nothing is imported), so a violation names the file.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import extproc

PACKAGE = Path(extproc.__file__).resolve().parent
MAX_LINES = 700
MAX_TOP_MODULES = 8


def hand_written() -> list[Path]:
    """Every Python module of the package except generated protobuf code."""
    return [
        p for p in sorted(PACKAGE.rglob("*.py")) if not p.name.endswith(("_pb2.py", "_pb2_grpc.py"))
    ]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_imports(path: Path, modules: set[str], name: str | None = None) -> set[str]:
    """The package modules `path` imports at module level (not inside functions).

    `from a.b import c` counts as importing `a.b.c` when that is a module, else `a.b`.
    Imports under `if TYPE_CHECKING:` do not run, so they are left out.
    """
    tree = ast.parse(path.read_text(), str(path))
    name = name or module_name(path)
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name in modules)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name if is_package else name.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        anchor = anchor.rpartition(".")[0]
                    base = f"{anchor}.{base}".rstrip(".")
                for alias in node.names:
                    target = f"{base}.{alias.name}"
                    if target in modules:
                        found.add(target)
                    elif base in modules:
                        found.add(base)
            elif isinstance(node, ast.If):
                test = node.test
                if not (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING"):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)

    visit(tree.body)
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = hand_written()
    modules = {module_name(p) for p in paths}
    return {module_name(p): module_imports(p, modules) for p in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path (first module repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := walk(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := walk(start)):
            return cycle
    return None


def test_no_hand_written_module_is_over_700_lines() -> None:
    long = {
        str(p.relative_to(PACKAGE.parent)): n
        for p in hand_written()
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


def test_the_top_of_the_package_holds_few_plain_modules() -> None:
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_MODULES, top


def test_no_import_cycles_between_modules() -> None:
    assert find_cycle(import_graph()) is None


@pytest.mark.parametrize(
    ("graph", "cycle"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
        ({"a": {"b"}, "b": {"b2"}, "b2": {"b"}}, ["b", "b2", "b"]),
    ],
)
def test_the_cycle_finder_finds_cycles(graph: dict[str, set[str]], cycle: list[str] | None) -> None:
    assert find_cycle(graph) == cycle


def test_the_import_reader_sees_module_level_imports_only(tmp_path: Path) -> None:
    source = tmp_path / "sample.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "import extproc.settings\n"
        "from extproc.store import schema\n"
        "from extproc.metering.prices import usd\n"
        "if TYPE_CHECKING:\n"
        "    from extproc.dataplane import exchange\n"
        "def later():\n"
        "    from extproc.governance import budget\n"
    )
    modules = {m for m in import_graph()}
    assert module_imports(source, modules, "extproc.sample") == {
        "extproc.settings",
        "extproc.store.schema",
        "extproc.metering.prices",
    }


# Which packages each package may import at module level: the data path's layers, bottom
# up. The same rules are stated in each package's `__init__` docstring.
ALLOWED = {
    "wire": set(),
    "store": set(),
    "metering": {"wire", "store"},
    "governance": {"metering", "store", "wire"},
    "routing": {"governance", "metering", "wire"},
    "books": {"metering", "store", "wire"},
    "insight": {"books", "governance", "metering", "routing", "settings", "store", "wire"},
    "dataplane": {"governance", "insight", "metering", "routing", "settings", "store", "wire"},
    "console": {"books", "governance", "insight", "metering", "routing", "store", "wire"},
    "simulator": {"metering", "wire"},
    "devstack": {"governance", "metering", "settings", "simulator", "store", "wire"},
}


def package_of(module: str) -> str:
    return module.split(".")[1] if module.count(".") >= 1 else ""


def test_packages_import_only_the_layers_below_them() -> None:
    found: dict[str, set[str]] = {}
    for module, targets in import_graph().items():
        for target in targets:
            a, b = package_of(module), package_of(target)
            if a != b and b not in {"v1", ""}:
                found.setdefault(a, set()).add(b)
    breaches = {pkg: sorted(uses - ALLOWED[pkg]) for pkg, uses in found.items() if pkg in ALLOWED}
    assert {pkg: uses for pkg, uses in breaches.items() if uses} == {}
