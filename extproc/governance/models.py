"""`GET /v1/models` answered per key: what this caller may actually ask for.

IDEs and Codex populate their model pickers from this list. The provider's own list would
offer models the policy refuses (and would need the workspace key to fetch), so the sidecar
answers itself: the models the caller's service may use (its `allowed_models`, else every
model the price table can bill exactly) plus the policy's aliases that lead to one of them.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from typing import Any

from extproc.governance.keys import Identity
from extproc.governance.policy import Policy
from extproc.wire.errors import OpenAIError

CREATED = 0  # the list carries no real creation times; 0 says so rather than inventing one


def models_for(policy: Policy, identity: Identity, priced: Collection[str]) -> list[dict[str, Any]]:
    settings = policy.routing_for(identity.workspace, identity.service)
    allowed = settings.allowed_models
    names = list(allowed) if allowed is not None else sorted(priced)
    models = [_model(name, "openai") for name in names]
    seen = {m["id"] for m in models}
    for alias, target in sorted(policy.routing.aliases.items()):
        if alias not in seen and settings.allows(target):
            models.append(_model(alias, "extproc-alias"))
            seen.add(alias)
    return models


def _model(name: str, owner: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": CREATED, "owned_by": owner}


def list_body(models: list[dict[str, Any]]) -> bytes:
    return json.dumps({"object": "list", "data": models}).encode()


def retrieve_body(models: list[dict[str, Any]], model_id: str) -> tuple[int, bytes]:
    """One model of the caller's list, or OpenAI's 404 for a model it may not use."""
    for model in models:
        if model["id"] == model_id:
            return 200, json.dumps(model).encode()
    error = OpenAIError(
        404,
        f"The model '{model_id}' does not exist or you do not have access to it.",
        "invalid_request_error",
        "model",
        "model_not_found",
    )
    return 404, error.body()
