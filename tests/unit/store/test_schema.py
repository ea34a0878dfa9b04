"""Redis key and scope names are spelled in `extproc.store.schema` and nowhere else."""

from __future__ import annotations

import ast
import re
from importlib import resources
from pathlib import Path

from extproc.store import schema

PACKAGE = Path(schema.__file__).resolve().parent.parent
SCHEMA = Path(schema.__file__).resolve()

# A string literal that looks like part of a Redis key or a budget scope name.
KEY_SHAPES = re.compile(
    r"\{extproc:|\{ws:|^extproc:(keys|ledgers)$|^(team|svc|key|model|sess):|"
    r":(spent|held|day|hour|ledger|revoked|alerted|resv|seen|sess|prefix|rl)(:|$)"
)
SCOPE_NAMES = frozenset({"ws", "#requests"})


def _docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            value = body[0].value
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                found.add(id(value))
    return found


def key_literals(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    skip = _docstrings(tree)
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            text = node.value
            if KEY_SHAPES.search(text) or text in SCOPE_NAMES:
                hits.append(f"{path.name}:{node.lineno}: {text!r}")
    return hits


def test_key_names_are_spelled_only_in_the_schema() -> None:
    hits = [
        f"{path.parent.name}/{hit}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != SCHEMA and "_pb2" not in path.name
        for hit in key_literals(path)
    ]
    assert hits == []


def test_the_check_finds_a_key_literal(tmp_path: Path) -> None:
    """The scan above must be able to fail: it sees keys and scopes in code, not in prose."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        '"""Docstring naming {ws:x}:spent:2026 is prose."""\n'
        'A = "{ws:%s}" % "dev"\n'
        'B = f"svc:{A}"\n'
        'C = "ws"\n'
        'D = "a plain: string"\n'
    )
    hits = key_literals(sample)
    assert sorted(h.rsplit(": ", 1)[1] for h in hits) == ["'svc:'", "'ws'", "'{ws:%s}'"]


def test_lua_scripts_use_only_the_schema_suffixes() -> None:
    """The scripts get the workspace prefix and append suffixes: each must be the schema's."""
    lua = resources.files("extproc.store.lua")
    used: set[str] = set()
    for script in lua.iterdir():
        if not script.name.endswith(".lua"):
            continue
        source = script.read_text()
        used |= set(re.findall(r"\bp \.\. '(:[a-z:]+?):?'", source))
    assert used, "the pattern no longer matches how the scripts build keys"
    assert {suffix.strip(":") for suffix in used} <= schema.LUA_SUFFIXES


def test_workspace_keys_share_one_hash_tag() -> None:
    prefix = schema.workspace_prefix("dev")
    keys = [
        schema.spent_key(prefix, "2026-01"),
        schema.held_key(prefix, "2026-01"),
        schema.day_key(prefix, "2026-01-02"),
        schema.hour_key(prefix, "2026-01-02T03"),
        schema.ledger_key(prefix),
        schema.revoked_key("dev"),
        schema.burn_alerted_key("dev", "2026-01-02", schema.WORKSPACE_SCOPE),
    ]
    assert {k.split("}", 1)[0] + "}" for k in keys} == {"{ws:dev}"}
    assert len(set(keys)) == len(keys)
    assert schema.workspace_prefix("") == "{ws:" + schema.UNATTRIBUTED + "}"


def test_session_scope_is_bounded_and_belongs_to_a_key() -> None:
    bounded = "s" * schema.SESSION_ID_MAX
    assert schema.session_scope("key_a", "s" * 1000) == schema.SESS + "key_a:" + bounded
    prefix = schema.workspace_prefix("dev")
    assert schema.session_key(prefix, "key_a", "s" * 1000) == "{ws:dev}:sess:key_a:" + bounded
    # Another key naming the same session id gets names of its own.
    assert schema.session_key(prefix, "key_b", "x") != schema.session_key(prefix, "key_a", "x")
    assert schema.session_scope("key_b", "x") != schema.session_scope("key_a", "x")
