"""What callers are told: denials in OpenAI's error shape, and the budget headers.

The error types and codes are chosen for what real clients do with them:

* over a hard cap -> 429 `insufficient_quota` with `x-should-retry: false`. The openai SDKs
  raise `RateLimitError` and, told not to retry, stop at once; Codex CLI treats
  `insufficient_quota` as "quota exceeded" and does not retry either. The message says
  which of three things is true (see `denial`): the scope's budget is spent; what is left is
  held by requests in flight; or something is left but this request's worst case (its
  input plus every output token it may write, priced before it is sent) does not fit. The
  last names what the request could cost (tokens and model), what is left of which limit,
  and the way out (a lower output cap that would fit, a cheaper model, whom to ask).
* over a rate limit -> 429 `rate_limit_exceeded` with `retry-after` / `retry-after-ms` and
  OpenAI's `x-ratelimit-*` headers: the SDKs wait exactly that long and retry by themselves.
* unknown, expired or revoked key -> 401 `invalid_api_key` (SDK `AuthenticationError`).
* a key the runaway breaker paused -> 403 `key_paused` with `x-should-retry: false` (SDK
  `PermissionDeniedError`, no retries): why, since when, and how it is resumed.

Every budget refusal carries a link to ask for a top-up (`topup_link`), which the developer
opens from where the refusal reached them (Codex prints it).
* budget store down and the workspace fails closed -> 503 (SDKs retry with backoff).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo

from extproc.governance.budget import Decision, Plan, ScopeLimit, Standing
from extproc.governance.keys import Identity
from extproc.governance.pauses import Pause
from extproc.governance.policy import Policy
from extproc.metering.prices import MILLION, PriceTable, usd
from extproc.metering.worstcase import token_rates
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


TOPUP_PATH = "/extproc/topup/"
PAUSED_CODE = "key_paused"


def topup_link(public_url: str, scope: str) -> str:
    """Where a refused caller asks for more of `scope`: the gateway's own page (the key
    is given there, in a form: never in the URL)."""
    path = TOPUP_PATH + scope
    return public_url.rstrip("/") + path if public_url else f"this gateway's {path}"


def paused(pause: Pause, tz: ZoneInfo, console_url: str = "") -> OpenAIError:
    """The refusal of a paused key: why, since when, how it is resumed."""
    since = _reset_text(pause.since_ms, tz)
    who = "the runaway breaker" if pause.by == "breaker" else pause.by
    where = f" ({console_url.rstrip('/')}/keys)" if console_url else ""
    return OpenAIError(
        403,
        f"Key {pause.key_id} is paused: {who} paused it at {since} because {pause.why}. "
        f"Nothing is sent with it until a person resumes it: its owner or an approver in the "
        f"console{where}, or an admin with `extproc keys resume {pause.key_id}`.",
        "invalid_request_error",
        None,
        PAUSED_CODE,
    )


def denial(
    decision: Decision,
    plan: Plan | None,
    tz: ZoneInfo,
    ask: Ask | None = None,
    topup: str = "",
) -> tuple[OpenAIError, dict[str, str]]:
    """The refusal of a denied reservation, in OpenAI's shape, and its headers.

    A budget denial is one of three: the denied scope's spend has reached its hard limit
    (exhausted); what is left is all held by requests in flight; or this request's worst
    case is more than what is left. `ask` (what the request would hold) lets the last say
    which tokens on which model and which output cap would fit. `topup` is the gateway's
    public URL (may be empty): a budget refusal links to its top-up request page.
    """
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
    reset = _reset_text(plan.period.end_ms, tz)
    headers = {
        "x-should-retry": "false",
        "x-extproc-budget-scope": scope.label if scope else "",  # type: ignore[union-attr]
        "x-extproc-budget-reset": reset,
    }
    hard = scope.hard_nanos if isinstance(scope, ScopeLimit) else None
    more = ""
    if isinstance(scope, ScopeLimit):
        link = topup_link(topup, scope.scope)
        headers["x-extproc-topup-url"] = link if topup else TOPUP_PATH + scope.scope
        more = f" Ask for a top-up: {link}"
    if hard is not None and standing is not None and standing.spent_nanos < hard:
        message = _no_room(scope, standing, plan, ask, reset) + more  # type: ignore[arg-type]
        return OpenAIError(429, message, "insufficient_quota", None, "insufficient_quota"), headers
    spent = usd(standing.spent_nanos, cents=True) if standing else "?"
    budget = scope.budget_nanos if scope else None  # type: ignore[union-attr]
    granted = scope.topup_nanos if isinstance(scope, ScopeLimit) else 0
    message = (
        f"Budget exhausted for {scope.label if scope else plan.workspace}: "  # type: ignore[union-attr]
        f"${spent} spent of a ${usd(hard or 0, cents=True)} hard limit"
        f"{f' (budget ${usd(budget, cents=True)})' if budget else ''}"
        f"{f', top-ups included (${usd(granted, cents=True)})' if granted else ''} "
        f"for period {plan.period.id}. It resets at {reset}."
        + (more or " Ask your platform team to raise the budget if this is expected.")
    )
    return OpenAIError(429, message, "insufficient_quota", None, "insufficient_quota"), headers


@dataclass(frozen=True, slots=True)
class Ask:
    """What a refused request would have held, for a refusal that says so (see `ask`)."""

    model: str
    input_tokens: int
    output_tokens: int  # held for all its outputs together
    outputs: int
    input_rate: int  # nano-dollars per MILLION tokens, as the hold prices them (rates.py)
    output_rate: int
    fees_nanos: int  # the rest of the hold: built-in tool calls the request may make
    output_param: str | None  # the request field that lowers the hold; None: there is none
    stated: bool  # the request set that field itself
    source: str  # where the held output came from when the request set no cap


def ask(
    prices: PriceTable,
    plan: Plan,
    *,
    model: str,
    outputs: int,
    output_param: str | None,
    stated: bool,
    source: str,
) -> Ask:
    """The `Ask` of a refused request's plan: made on the refusal path only."""
    per_input, per_output = token_rates(prices, model, plan.counted_input)
    output_tokens = plan.tokens - plan.counted_input
    tokens_nanos = -(-(plan.counted_input * per_input + output_tokens * per_output) // MILLION)
    return Ask(
        model=model,
        input_tokens=plan.counted_input,
        output_tokens=output_tokens,
        outputs=max(outputs, 1),
        input_rate=per_input,
        output_rate=per_output,
        fees_nanos=max(plan.reserve_nanos - tokens_nanos, 0),
        output_param=output_param,
        stated=stated,
        source=source,
    )


_TENTH_CENT = 100_000  # nanos: amounts are shown to 1/100 of a cent, in cents when whole
_CENT = 10_000_000


def _shown(nanos: int, *, up: bool = False) -> str:
    """An amount for people, rounded toward what keeps the text true: a cost up, a
    remainder down (so "could cost" is never shown at or below "left")."""
    q = -(-nanos // _TENTH_CENT) * _TENTH_CENT if up else nanos // _TENTH_CENT * _TENTH_CENT
    if q == 0 and nanos > 0:
        return usd(nanos)
    return usd(q, cents=q % _CENT == 0)


def _up(nanos: int) -> str:
    return _shown(nanos, up=True)


def _down(nanos: int) -> str:
    return _shown(nanos)


def _no_room(scope: ScopeLimit, standing: Standing, plan: Plan, ask: Ask | None, reset: str) -> str:
    """The refusal when the budget is not spent: held by others, or too small for this one."""
    hard = scope.hard_nanos or 0
    spent, held = standing.spent_nanos, standing.held_nanos
    left = hard - spent - held
    where = f"the ${_down(hard)} hard limit of {scope.label} for period {plan.period.id}"
    in_flight = f", ${_up(held)} held for requests in flight" if held else ""
    cost = f"This request could cost up to ${_up(plan.reserve_nanos)}{_what(ask)}"
    if left <= 0:
        return (
            f"{cost}, and nothing is free under {where}: ${_down(spent)} spent{in_flight}. "
            "Requests in flight give back what they do not use when they finish: retry shortly. "
            f"It resets at {reset}."
        )
    return (
        f"{cost}, more than the ${_down(left)} left of {where} (${_down(spent)} spent"
        f"{in_flight}). To fit: {', '.join(_ways_out(ask, left))}. It resets at {reset}."
    )


def _what(ask: Ask | None) -> str:
    """The tokens and model behind a worst case, and where its output side came from."""
    if ask is None:
        return ""
    per = f" ({ask.outputs} outputs)" if ask.outputs > 1 else ""
    text = (
        f" ({ask.input_tokens:,} input tokens and up to {ask.output_tokens:,} output tokens"
        f"{per} on {ask.model}, priced before it is sent"
    )
    if ask.output_param is None:
        text += f"; this endpoint takes no output cap, so {ask.source} is held"
    elif not ask.stated:
        text += f"; no {ask.output_param} was set, so {ask.source} is held"
    return text + ")"


def _ways_out(ask: Ask | None, left: int) -> list[str]:
    """What the caller can change so that the worst case fits in `left`."""
    ways = []
    if ask is not None:
        # In millionths of a nano-dollar, as holds are priced; rounded up once, like a hold.
        input_cost = -(-ask.input_tokens * ask.input_rate // MILLION) + ask.fees_nanos
        fit = 0
        if ask.output_param is not None and ask.output_rate and input_cost < left:
            room = (left - ask.fees_nanos) * MILLION - ask.input_tokens * ask.input_rate
            fit = room // (ask.output_rate * ask.outputs)
        if fit >= 1:
            ways.append(f"set {ask.output_param} to {fit:,} or less")
        elif input_cost >= left:
            ways.append(f"send less input (the input alone holds ${_up(input_cost)})")
    ways.append("use a cheaper model")
    ways.append("or ask your platform team to raise the limit")
    return ways


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
