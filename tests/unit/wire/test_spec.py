"""The endpoint spec owns every endpoint fact: nobody else spells a name or a path, and what
the spec says agrees with how the endpoint's own module reads its bodies."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest

import extproc
from extproc.wire.paths import Kind, classify
from extproc.wire.spec import (
    GROUPS,
    METERED,
    PASSTHROUGH,
    PRICED,
    SPECS,
    EndpointSpec,
    Pricing,
    display_name,
)

PACKAGE = Path(extproc.__file__).resolve().parent
OWNERS = ("wire", "simulator")
"""`wire` owns the names; the simulator is the upstream, an independent implementation of the
provider's API that must not share our table (an oracle built from the code under test
proves nothing)."""
PLAIN_WORDS = frozenset({"models"})
"""Endpoint names that are also ordinary field names (a price file's `models` table)."""

# The smallest valid body of each metered endpoint, to ask its reader what a spec claims.
MINIMAL: dict[str, dict[str, Any]] = {
    "responses": {"model": "m", "input": [{"role": "user", "content": "a"}]},
    "chat.completions": {"model": "m", "messages": [{"role": "user", "content": "a"}]},
    "completions": {"model": "m", "prompt": "a"},
    "embeddings": {"model": "m", "input": "a"},
}


def spelled_outside_wire(root: Path = PACKAGE) -> list[str]:
    """Every string constant under `root` (but its owners) naming an endpoint or its path."""
    names = ({s.name for s in SPECS} | set(GROUPS)) - PLAIN_WORDS
    found: list[tuple[str, int, str]] = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] in OWNERS or path.name.endswith("_pb2.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Constant) or not isinstance(node.value, str):
                continue
            value = node.value
            if value in names or (value.startswith("/v1/") and " " not in value):
                found.append((str(rel), node.lineno, value))
    return [f"{rel}:{line}: {value!r}" for rel, line, value in sorted(found)]


def test_no_endpoint_name_or_path_is_spelled_outside_wire() -> None:
    """Ask `extproc.wire.spec` instead: a fact spelled twice drifts (telemetry once called
    every endpoint but four "chat")."""
    assert spelled_outside_wire() == []


def test_the_scan_sees_a_name_or_path_spelled_elsewhere(tmp_path: Path) -> None:
    (tmp_path / "routing").mkdir()
    (tmp_path / "wire").mkdir()
    (tmp_path / "routing" / "a.py").write_text(
        'FIELD = {"chat.completions": "max_tokens"}\nPATH = "/v1/embeddings"\n'
        '"""A docstring that mentions POST /v1/embeddings is prose."""\nWORD = "models"\n'
    )
    (tmp_path / "wire" / "b.py").write_text('NAME = "embeddings"\n')
    assert spelled_outside_wire(tmp_path) == [
        "routing/a.py:1: 'chat.completions'",
        "routing/a.py:2: '/v1/embeddings'",
    ]


def test_one_name_one_display_and_every_route_classifies_to_its_spec() -> None:
    for name in {s.name for s in SPECS}:
        assert {s.display for s in SPECS if s.name == name} == {display_name(name)}
    for spec in METERED:
        target = classify("POST", spec.path)
        assert (target.kind, target.spec) == (Kind.METERED, spec)
    assert display_name("reconcile") == "OpenAI API"  # not an endpoint: the provider's API


def test_passthrough_facts_are_whole() -> None:
    assert set(GROUPS) == {s.group for s in PASSTHROUGH}
    for spec in PASSTHROUGH:
        assert not spec.metered and spec.pattern is not None and spec.operation
        priced = spec.pricing is Pricing.USAGE
        assert (spec.reader is not None) is priced is (spec.output_ceiling is not None)
    assert set(PRICED) == {s.name for s in PASSTHROUGH if s.pricing is Pricing.USAGE}


@pytest.mark.parametrize("spec", METERED, ids=lambda s: s.name)
def test_the_spec_says_what_the_endpoints_reader_reads(spec: EndpointSpec) -> None:
    reader = spec.reader
    assert reader is not None and spec.metered and spec.pricing is Pricing.USAGE
    body = MINIMAL[spec.name]
    reader.facts(body)  # the minimal body is valid
    if spec.output_cap_field is not None:
        assert reader.facts({**body, spec.output_cap_field: 7}).output_cap == 7
        if spec.legacy_output_cap_field is not None:
            legacy = {**body, spec.legacy_output_cap_field: 9}
            assert reader.facts(legacy).output_cap == 9
    if spec.effort_field:
        *outer, leaf = spec.effort_field
        with_effort: dict[str, Any] = {leaf: "low"}
        for key in reversed(outer):
            with_effort = {key: with_effort}
        assert reader.facts({**body, **with_effort}).reasoning_effort == "low"
    else:
        assert reader.facts(body).reasoning_effort is None
    if spec.cache_prefix_key is not None:
        items = [{"role": "user", "content": "first"}, {"role": "user", "content": "second"}]
        texts = list(reader.input_texts({**body, spec.cache_prefix_key: items}))
        assert "first" in texts and "second" in texts
    if spec.prompt_cache_key:
        assert reader.facts({**body, "prompt_cache_key": "k"}).prompt_cache_key == "k"
