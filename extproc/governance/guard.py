"""What callers are told: denials in OpenAI's error shape, and the budget headers.

The error types and codes are chosen for what real clients do with them:

* over a hard cap -> 429 `insufficient_quota` with `x-should-retry: false`. The openai SDKs
  raise `RateLimitError` and, told not to retry, stop at once; Codex CLI treats
  `insufficient_quota` as "quota exceeded" and does not retry either. The message names the
  exhausted scope, what was spent and when the period resets, so the person reading it knows
  whom to ask and how long to wait.
* over a rate limit -> 429 `rate_limit_exceeded` with `retry-after` / `retry-after-ms` and
  OpenAI's `x-ratelimit-*` headers: the SDKs wait exactly that long and retry by themselves.
* unknown, expired or revoked key -> 401 `invalid_api_key` (SDK `AuthenticationError`).
* budget store down and the workspace fails closed -> 503 (SDKs retry with backoff).
"""

from __future__ import annotations

import math
from datetime import datetime
from zoneinfo import ZoneInfo

from extproc.governance.budget import Decision, Plan
from extproc.governance.keys import Identity
from extproc.governance.policy import Policy
from extproc.metering.prices import usd
from extproc.wire.errors import OpenAIError

UNKNOWN_KEY = OpenAIError(
    401,
    "Incorrect or revoked API key provided. Ask your platform team for an extproc key "
    "(extproc keys create) and send it as 'Authorization: Bearer <key>'.",
    "invalid_request_error",
    None,
    "invalid_api_key",
)


REFUSED_STATUSES = frozenset({401, 402, 403, 413, 429})
"""Refusals of who the caller is or what they may spend: each must reach the person."""


def is_codex(originator: str, user_agent: str) -> bool:
    """Codex CLI names itself in `originator` (codex_cli_rs, codex_exec, ...) and its UA."""
    return originator.startswith("codex") or user_agent.lower().startswith("codex")


def contact_of(policy: Policy | None, identity: Identity | None) -> str | None:
    """Whom the caller should ask: their team's contact, else their workspace's."""
    if policy is None or identity is None:
        return None
    ws = policy.workspaces.get(identity.workspace)
    if ws is None:
        return None
    service = ws.services.get(identity.service)
    team = (service.team if service and service.team else None) or identity.team
    return ws.contact_for(team)


def for_client(err: OpenAIError, *, codex: bool, contact: str | None) -> OpenAIError:
    """The refusal as this client should get it: whom to ask in every message, and for
    Codex CLI a status it shows at once.

    Measured with the real Codex CLI: it answers `429 insufficient_quota` with its own
    "Quota exceeded. Check your plan and billing details." (sending people to OpenAI's
    billing page, not to us), other 429s with "exceeded retry limit" and no reason, and
    401/402/403 with our message only after six requests. A 400 prints our JSON body after
    exactly one request, so Codex gets its refusals as 400 with the same `type` and `code`.
    SDK clients keep OpenAI's statuses (429 quota and rate limits, 401, 403, 413): their
    retry logic depends on them, and the exception text carries the same message.
    """
    if err.status not in REFUSED_STATUSES:
        return err
    message = err.message
    if contact and contact not in message:
        message = f"{message} Whom to ask: {contact}."
    status = 400 if codex else err.status
    if status == err.status and message == err.message:
        return err
    return OpenAIError(status, message, err.type, err.param, err.code)


def bearer(authorization: str) -> str:
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _reset_text(ms: int, tz: ZoneInfo) -> str:
    return datetime.fromtimestamp(ms / 1000, tz).isoformat(timespec="minutes")


def denial(
    decision: Decision, plan: Plan | None, tz: ZoneInfo
) -> tuple[OpenAIError, dict[str, str]]:
    if decision.reason == "revoked":
        return UNKNOWN_KEY, {}
    if decision.reason == "redis_down":
        return (
            OpenAIError(
                503,
                "The budget service is unavailable and this workspace is configured to fail "
                "closed; no request is forwarded until it returns.",
                "server_error",
                None,
                "budget_store_unavailable",
            ),
            {"retry-after": "2"},
        )
    assert plan is not None
    if decision.reason == "rate":
        rate = decision.denied
        seconds = max(math.ceil(decision.retry_after_ms / 1000), 1)
        unit = "requests" if decision.limit_kind == "rpm" else "tokens"
        message = (
            f"Rate limit reached for {rate.label if rate else plan.workspace}: "  # type: ignore[union-attr]
            f"limit {decision.limit} {unit} per minute. Please try again in {seconds}s."
        )
        headers = {
            "retry-after": str(seconds),
            "retry-after-ms": str(decision.retry_after_ms),
            f"x-ratelimit-limit-{unit}": str(decision.limit),
            f"x-ratelimit-remaining-{unit}": "0",
            f"x-ratelimit-reset-{unit}": f"{decision.retry_after_ms / 1000:.3f}s",
            "x-extproc-limit-scope": rate.label if rate else "",
        }
        return OpenAIError(429, message, unit, None, "rate_limit_exceeded"), headers
    scope = decision.denied
    standing = decision.standings[0] if decision.standings else None
    spent = usd(standing.spent_nanos, cents=True) if standing else "?"
    reset = _reset_text(plan.period.end_ms, tz)
    budget = scope.budget_nanos if scope else None  # type: ignore[union-attr]
    hard = scope.hard_nanos if scope else None  # type: ignore[union-attr]
    message = (
        f"Budget exhausted for {scope.label if scope else plan.workspace}: "  # type: ignore[union-attr]
        f"${spent} spent of a ${usd(hard or 0, cents=True)} hard limit"
        f"{f' (budget ${usd(budget, cents=True)})' if budget else ''} for period {plan.period.id}. "
        f"It resets at {reset}. Ask your platform team to raise the budget if this is expected."
    )
    headers = {
        "x-should-retry": "false",
        "x-extproc-budget-scope": scope.label if scope else "",  # type: ignore[union-attr]
        "x-extproc-budget-reset": reset,
    }
    return OpenAIError(429, message, "insufficient_quota", None, "insufficient_quota"), headers


def visibility_headers(identity: Identity, decision: Decision | None) -> dict[str, str]:
    """Who the caller is billed as, and what the binding budget has left."""
    headers = {"x-extproc-workspace": identity.workspace, "x-extproc-service": identity.service}
    if identity.team:
        headers["x-extproc-team"] = identity.team
    binding = decision.binding if decision else None
    if binding is not None and binding.scope.hard_nanos:
        left = binding.left_nanos  # against the hard limit, as /me reports it
        headers["x-extproc-budget-scope"] = binding.scope.label
        headers["x-extproc-budget-remaining-usd"] = usd(left)
        headers["x-extproc-budget-remaining-percent"] = (
            f"{100 * left / binding.scope.hard_nanos:.1f}"
        )
    warned = [s.scope.label for s in (decision.standings if decision else ()) if s.over_soft]
    if warned:
        headers["x-extproc-budget-warning"] = "soft limit reached: " + ", ".join(warned)
    if decision is not None and decision.reason == "ok_local":
        headers["x-extproc-budget-warning"] = "budget store unavailable; accounted locally"
    return headers
