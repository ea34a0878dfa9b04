"""The compiled request path: which build may run, and the fallback to the sources.

The whole suite runs against whatever `make compile` left (make test builds it first, and
runs the unit tests once more with EXTPROC_PURE=1). These tests pin the rules that keep a
stale or partial build from ever running.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from extproc import compiled


def test_a_current_build_runs_and_any_source_change_falls_back_to_python() -> None:
    current = {"python": sys.version, **{m: "a" * 64 for m in compiled.HOT_MODULES}}
    assert compiled.verdict("", dict(current), current) == "compiled"
    assert compiled.verdict("", dict(current, opt_level="3"), current) == "compiled"
    edited = dict(current, **{"wire/chat": "b" * 64})
    state = compiled.verdict("", edited, current)
    assert state.startswith("pure: the compiled build is stale (wire/chat)")
    other_python = dict(current, python="3.99")
    assert compiled.verdict("", other_python, current).startswith("pure: the compiled build")
    missing = {k: v for k, v in current.items() if k != "wire/sse"}
    assert "wire/sse" in compiled.verdict("", missing, current)


def test_no_build_an_unreadable_one_or_extproc_pure_mean_python() -> None:
    current = {"python": sys.version}
    assert compiled.verdict("", None, current) == "pure: not built (make compile)"
    assert compiled.verdict("", "unreadable", current).startswith("pure: unreadable")
    assert compiled.verdict("1", dict(current), current) == "pure: EXTPROC_PURE is set"
    assert compiled.verdict("0", dict(current), current) == "compiled"


def test_every_hot_module_exists_and_is_named_once() -> None:
    assert len(set(compiled.HOT_MODULES)) == len(compiled.HOT_MODULES)
    for module in compiled.HOT_MODULES:
        assert (compiled.PACKAGE / f"{module}.py").is_file(), module


def _imports(env: dict[str, str]) -> dict[str, str]:
    """Where a fresh interpreter loads every hot module from, and the state it decided."""
    code = (
        "import importlib, json, extproc.compiled as c\n"
        "files = {n: importlib.import_module(n).__file__ for n in sorted(c.NAMES)}\n"
        "print(json.dumps({'state': c.state, **files}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, check=True
    )
    return json.loads(out.stdout)


def test_extproc_pure_loads_every_hot_module_from_its_source() -> None:
    found = _imports({"EXTPROC_PURE": "1"})
    assert found.pop("state") == "pure: EXTPROC_PURE is set"
    assert all(path.endswith(".py") for path in found.values()), found


def test_the_build_present_is_the_build_that_runs() -> None:
    """With a current build every hot module is an extension; without one, every one is a
    source file: never a mix (an interpreted class cannot subclass a compiled one)."""
    found = _imports({"EXTPROC_PURE": ""})
    state = found.pop("state")
    kinds = {path.rsplit(".", 1)[-1] for path in found.values()}
    if state == "compiled":
        assert kinds == {"so"}, found
    else:
        assert kinds == {"py"}, found
    manifest = json.loads(compiled.MANIFEST.read_text()) if compiled.MANIFEST.is_file() else {}
    manifest.pop("opt_level", None)
    assert (state == "compiled") == (manifest == compiled.fingerprint())


def test_make_test_runs_the_compiled_build_where_it_can_be_built() -> None:
    """`make test` sets EXTPROC_EXPECT_COMPILED after `make compile`: on a machine with a C
    compiler the suite must not quietly test the fallback alone."""
    if not os.environ.get("EXTPROC_EXPECT_COMPILED") or not shutil.which("cc"):
        pytest.skip("only under make test, on a machine with a C compiler")
    assert compiled.state == "compiled"
