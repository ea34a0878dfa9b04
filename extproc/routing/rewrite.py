"""Apply a routing decision to a parsed request body.

Each endpoint names its fields differently (`max_output_tokens` vs `max_completion_tokens`,
`reasoning.effort` vs `reasoning_effort`); this is the one place that knows. The body is
changed in place and re-serialised once by `metering.finalize`.
"""

from __future__ import annotations

from typing import Any

from extproc.routing.decide import RouteDecision

_OUTPUT_CAP_FIELD = {
    "responses": "max_output_tokens",
    "chat.completions": "max_completion_tokens",
    "completions": "max_tokens",
}
_CACHE_KEY_ENDPOINTS = frozenset({"responses", "chat.completions"})


def output_cap_field(endpoint: str) -> str | None:
    """The request field that caps an endpoint's output; None where there is none."""
    return _OUTPUT_CAP_FIELD.get(endpoint)


def apply_route(
    endpoint: str, body: dict[str, Any], decision: RouteDecision, cache_key: str | None
) -> bool:
    """Rewrite `body` for the upstream; True if anything changed."""
    changed = False
    if decision.model != body.get("model"):
        body["model"] = decision.model
        changed = True
    effort = decision.reasoning_effort
    if effort is not None and endpoint in ("responses", "chat.completions"):
        if endpoint == "responses":
            reasoning = body.get("reasoning")
            body["reasoning"] = {
                **(reasoning if isinstance(reasoning, dict) else {}),
                "effort": effort,
            }
        else:
            body["reasoning_effort"] = effort
        changed = True
    if decision.max_output_tokens is not None:
        changed |= set_output_cap(endpoint, body, decision.max_output_tokens)
    if (
        decision.inject_prompt_cache_key
        and cache_key
        and endpoint in _CACHE_KEY_ENDPOINTS
        and not body.get("prompt_cache_key")
    ):
        body["prompt_cache_key"] = cache_key
        changed = True
    return changed


def set_output_cap(endpoint: str, body: dict[str, Any], cap: int) -> bool:
    """Write the endpoint's output-cap field; False where the endpoint has none."""
    field = _OUTPUT_CAP_FIELD.get(endpoint)
    if field is None:
        return False
    if endpoint == "chat.completions" and "max_tokens" in body and field not in body:
        field = "max_tokens"  # keep the client's own (older) field rather than send both
    body[field] = cap
    return True
