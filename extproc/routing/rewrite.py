"""Apply a routing decision to a parsed request body.

Each endpoint names its fields differently (`max_output_tokens` vs `max_completion_tokens`,
`reasoning.effort` vs `reasoning_effort`); its spec (`extproc.wire.spec`) says which, and
this module writes them. The body is changed in place and re-serialised once by
`metering.finalize`.
"""

from __future__ import annotations

from typing import Any

from extproc.routing.decide import RouteDecision
from extproc.wire.spec import EndpointSpec


def apply_route(
    spec: EndpointSpec,
    body: dict[str, Any],
    decision: RouteDecision,
    cache_key: str | None,
    output_cap: int | None = None,
) -> bool:
    """Rewrite `body` for the upstream; True if anything changed.

    `output_cap`: a per-output cap admission decided to write when the request set none
    (the workspace enforces its `default_output_cap`); a routing cap wins over it.
    """
    changed = False
    if decision.model != body.get("model"):
        body["model"] = decision.model
        changed = True
    effort = decision.reasoning_effort
    if effort is not None and spec.effort_field:
        _set_effort(body, spec.effort_field, effort)
        changed = True
    cap = decision.max_output_tokens if decision.max_output_tokens is not None else output_cap
    if cap is not None:
        changed |= set_output_cap(spec, body, cap)
    if (
        decision.inject_prompt_cache_key
        and cache_key
        and spec.prompt_cache_key
        and not body.get("prompt_cache_key")
    ):
        body["prompt_cache_key"] = cache_key
        changed = True
    return changed


def _set_effort(body: dict[str, Any], where: tuple[str, ...], effort: str) -> None:
    """Write the effort at its path, keeping whatever else an enclosing object holds."""
    *outer, leaf = where
    target = body
    for key in outer:
        inner = target.get(key)
        target[key] = inner = dict(inner) if isinstance(inner, dict) else {}
        target = inner
    target[leaf] = effort


def set_output_cap(spec: EndpointSpec, body: dict[str, Any], cap: int) -> bool:
    """Write the endpoint's output-cap field; False where the endpoint has none."""
    field = spec.output_cap_field
    if field is None:
        return False
    legacy = spec.legacy_output_cap_field
    if legacy is not None and legacy in body and field not in body:
        field = legacy  # keep the client's own (older) field rather than send both
    body[field] = cap
    return True
