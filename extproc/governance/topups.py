"""Top-ups: asking for more when a budget refuses, and the grants that raise a hard limit.

A refused developer should not have to find someone who can edit the policy file and reload
it (the "Friday Halt"). They ask from where they are (the refusal's link, `/extproc/me`, the
API): how much, until when, why. Approvers named in the policy decide in the console or with
`extproc topup approve|deny`; small requests of named services can be approved at once. An
approved request becomes a *grant*: it raises one scope's hard limit by its amount until its
time, then ends by itself.

Where a grant lives, and what "the cap" is (the reserve script and this module must agree):

    {ws:W}:topups   hash   grant id -> "<scope>|<nanos>|<until_ms>"

    cap(scope, now) = policy hard limit + sum(nanos of entries of that scope, until_ms > now)

A grant counts while `until_ms > now` on the clock of whoever checks, so it ends on time on
every replica without anyone deleting it; the watch (`insight.runaway`) deletes it afterwards
and tells the requester. Requests live in their own hashes (`store.schema`); the decision
scripts below check and change a request and the grants hash in one step, and announce the
change on the key channel, so every sidecar's cache (`governance.live`) picks it up at once.

Everything here but `TopupStore` is a plain function of data.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

from extproc.governance.budget import ScopeLimit, attribution
from extproc.governance.keys import Identity
from extproc.governance.periods import period_at
from extproc.governance.policy import Policy, Workspace
from extproc.metering.prices import NANOS_PER_DOLLAR, usd, usd_for_people
from extproc.store.clients import AsyncClient
from extproc.store.schema import (
    KEYS_CHANNEL,
    SERVICE,
    TOPUP_INDEX,
    team_of,
    topup_auto_key,
    topup_request_key,
    topup_requests_key,
    topups_key,
)

MAX_REASON = 500
MAX_PENDING_PER_KEY = 3
KEEP_DECIDED_S = 400 * 86_400
"""A decided request's hash is kept this long (the audit log keeps the story longer)."""
STATUSES = ("pending", "approved", "denied", "expired", "revoked")
AUTO = "auto-approval"
"""Who approved a request the policy's `auto_approve` covered (`decided_by`)."""


class TopupError(ValueError):
    """A top-up request or decision was refused; the message names the field and why."""


class AutoLimitReached(TopupError):
    """Auto-approval would pass its ceiling for the period: the request waits for a person."""


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


# --- grants and the cap ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Grant:
    grant_id: str  # the id of the request it came from
    scope: str
    nanos: int
    until_ms: int

    def encode(self) -> str:
        return f"{self.scope}|{self.nanos}|{self.until_ms}"

    @staticmethod
    def decode(grant_id: str, value: str) -> Grant | None:
        scope, _, rest = value.rpartition("|")
        scope, _, nanos = scope.rpartition("|")
        if not scope or not nanos.isdigit() or not rest.isdigit():
            return None
        return Grant(grant_id, scope, int(nanos), int(rest))


def grants_from(raw: Mapping[Any, Any]) -> tuple[Grant, ...]:
    """The grants of one `{ws:W}:topups` hash as read (bytes or str), malformed ones skipped."""
    out = []
    for k, v in raw.items():
        grant = Grant.decode(_text(k), _text(v))
        if grant is not None:
            out.append(grant)
    return tuple(sorted(out, key=lambda g: (g.until_ms, g.grant_id)))


def live_topups(grants: Iterable[Grant], now_ms: int) -> dict[str, int]:
    """Scope -> the nanos its live grants add to its hard limit at `now_ms`."""
    out: dict[str, int] = {}
    for g in grants:
        if g.until_ms > now_ms:
            out[g.scope] = out.get(g.scope, 0) + g.nanos
    return out


# --- requests --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TopupRequest:
    request_id: str
    workspace: str
    scope: str
    label: str  # "workspace dev", "team dev/platform", "service dev/cli"
    amount_nanos: int
    until_ms: int
    reason: str
    key_id: str
    service: str
    team: str
    owner: str
    created_ms: int
    status: str = "pending"
    decided_by: str = ""
    decided_ms: int = 0
    note: str = ""
    notify_url: str = ""  # the requester's own webhook, for the decision and the expiry
    granted_nanos: int = 0
    granted_until_ms: int = 0
    ended_ms: int = 0

    @property
    def auto(self) -> bool:
        """Approved by the policy's `auto_approve`, not by a person."""
        return self.decided_by == AUTO

    def as_fields(self) -> dict[str, str]:
        """As stored in its Redis hash: every field a string."""
        return {name: str(value) for name, value in asdict(self).items()}

    @staticmethod
    def from_fields(raw: Mapping[Any, Any]) -> TopupRequest | None:
        data = {_text(k): _text(v) for k, v in raw.items()}
        if "request_id" not in data:
            return None
        values: dict[str, Any] = {}
        for f in fields(TopupRequest):
            text = data.get(f.name, "")
            if f.type == "int":
                values[f.name] = int(text) if text.lstrip("-").isdigit() else 0
            else:
                values[f.name] = text
        return TopupRequest(**values)

    def state(self, now_ms: int) -> str:
        """The status as of `now_ms`: a grant past its time is expired even before the
        watch sweeps it, and a pending request past its time can no longer be approved."""
        if self.status == "approved" and self.granted_until_ms <= now_ms:
            return "expired"
        if self.status == "pending" and self.until_ms <= now_ms:
            return "lapsed"
        return self.status

    def to_dict(self, tz: ZoneInfo, now_ms: int) -> dict[str, Any]:
        """For the API, the pages and `extproc topup list --json`."""

        def when(ms: int) -> str | None:
            return datetime.fromtimestamp(ms / 1000, tz).isoformat() if ms else None

        return {
            "id": self.request_id,
            "workspace": self.workspace,
            "scope": self.scope,
            "label": self.label,
            "amount_usd": usd(self.amount_nanos),
            "until": when(self.until_ms),
            "reason": self.reason,
            "key_id": self.key_id,
            "service": self.service,
            "team": self.team or None,
            "owner": self.owner or None,
            "requested_at": when(self.created_ms),
            "status": self.state(now_ms),
            "auto_approved": self.auto,
            "decided_by": self.decided_by or None,
            "decided_at": when(self.decided_ms),
            "note": self.note or None,
            "granted_usd": usd(self.granted_nanos) if self.granted_nanos else None,
            "granted_until": when(self.granted_until_ms),
            "ended_at": when(self.ended_ms),
        }


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def capped_scopes(policy: Policy, identity: Identity) -> tuple[ScopeLimit, ...]:
    """The scopes a caller may ask a top-up for: those of theirs with a hard limit."""
    scopes, _rates, _charged = attribution(policy, identity)
    return tuple(s for s in scopes if s.hard_nanos is not None)


def scope_team(ws: Workspace, scope: str) -> str | None:
    """The team a scope belongs to (for its approvers): a team's own, a service's team."""
    team = team_of(scope)
    if team is not None:
        return team
    service = ws.services.get(scope.removeprefix(SERVICE)) if scope.startswith(SERVICE) else None
    return service.team if service is not None else None


def parse_usd(text: Any, field: str = "amount_usd") -> int:
    """Nano-dollars from "20", "20.50" or 20; TopupError names `field`."""
    try:
        amount = Decimal(str(text).strip().removeprefix("$"))
    except (InvalidOperation, ValueError):
        raise TopupError(f"{field}: not an amount of dollars: {str(text)[:40]!r}") from None
    if not amount.is_finite() or amount <= 0:
        raise TopupError(f"{field}: must be more than $0, got {str(text)[:40]!r}")
    nanos = amount * NANOS_PER_DOLLAR
    if nanos != nanos.to_integral_value():
        raise TopupError(f"{field}: has more than 9 decimal places")
    return int(nanos)


WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")


def parse_until(text: Any, tz: ZoneInfo, period_end_ms: int, now_ms: int = 0) -> int:
    """Milliseconds from "period" (the end of the current budget period), a weekday name
    ("monday": the start of the next Monday), an ISO 8601 time (in the policy's zone when
    it names none) or a date (its midnight: the day beginning)."""
    raw = str(text or "").strip()
    if raw.lower() in ("", "period", "period_end"):
        return period_end_ms
    if raw.lower() in WEEKDAYS:
        return next_weekday(now_ms or wall_ms(), tz, WEEKDAYS.index(raw.lower()))
    try:
        value = datetime.fromisoformat(raw)
    except ValueError:
        raise TopupError(
            f"until: not a time: {raw[:40]!r} (ISO 8601 like 2026-12-07T09:00, a date, a "
            'weekday like "monday", or "period" for the end of the budget period)'
        ) from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=tz)
    return int(value.timestamp() * 1000)


def next_weekday(now_ms: int, tz: ZoneInfo, weekday: int = 0) -> int:
    """Midnight at the start of the next `weekday` (0: Monday) after `now_ms`, in `tz`."""
    now = datetime.fromtimestamp(now_ms / 1000, tz)
    days = (weekday - now.weekday()) % 7 or 7
    day = (now + timedelta(days=days)).date()
    return int(datetime(day.year, day.month, day.day, tzinfo=tz).timestamp() * 1000)


def _check_notify(ws: Workspace, url: str) -> str:
    url = url.strip()
    if not url:
        return ""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TopupError("notify_url: must be an http:// or https:// URL")
    allowed = ws.topups.requester_webhooks
    if not any(url.startswith(prefix) for prefix in allowed):
        raise TopupError(
            f"notify_url: must start with one of {', '.join(allowed)} "
            f"(workspaces.{ws.name}.topups.requester_webhooks)"
        )
    return url


def new_request(
    policy: Policy,
    identity: Identity,
    *,
    scope: str,
    amount_nanos: int,
    until_ms: int,
    reason: str,
    now_ms: int,
    notify_url: str = "",
) -> TopupRequest:
    """A checked request of `identity` for `scope`; TopupError names what is wrong."""
    ws = policy.workspaces[identity.workspace]
    mine = {s.scope: s for s in capped_scopes(policy, identity)}
    limit = mine.get(scope)
    if limit is None:
        raise TopupError(
            f"scope: {scope[:80]!r} is not a budget of this key with a hard limit "
            f"(yours: {', '.join(mine) or 'none'})"
        )
    largest = ws.topups.max_nanos or ws.budget_nanos
    if amount_nanos > largest:
        raise TopupError(
            f"amount_usd: at most {usd_for_people(largest)} per request "
            f"(workspaces.{ws.name}.topups.max_usd)"
        )
    if until_ms <= now_ms:
        raise TopupError("until: must be in the future")
    longest = ws.topups.max_days * 86_400_000
    if until_ms > now_ms + longest:
        raise TopupError(
            f"until: at most {ws.topups.max_days} days ahead (workspaces.{ws.name}.topups.max_days)"
        )
    reason = " ".join(reason.split())
    if not reason:
        raise TopupError("reason: say why (it is what the approver reads)")
    if len(reason) > MAX_REASON or not reason.isprintable():
        raise TopupError(f"reason: at most {MAX_REASON} printable characters")
    service = ws.services.get(identity.service)
    team = (service.team if service and service.team else None) or identity.team or ""
    return TopupRequest(
        request_id="tu_" + secrets.token_hex(5),
        workspace=ws.name,
        scope=scope,
        label=limit.label,
        amount_nanos=amount_nanos,
        until_ms=until_ms,
        reason=reason,
        key_id=identity.key_id,
        service=identity.service,
        team=team,
        owner=identity.owner or "",
        created_ms=now_ms,
        notify_url=_check_notify(ws, notify_url),
    )


def auto_approvable(
    ws: Workspace, request: TopupRequest, earlier: Iterable[TopupRequest], tz: ZoneInfo
) -> bool:
    """Whether `request` is approved at once: its service is named, its amount is under
    the line, and auto-approval has granted this scope less than its cap this period."""
    auto = ws.topups.auto_approve
    if auto is None or request.service not in auto.services:
        return False
    if request.amount_nanos >= auto.under_nanos:
        return False
    period = period_at(ws.period, request.created_ms, tz).id
    granted = sum(
        r.granted_nanos
        for r in earlier
        if r.auto
        and r.scope == request.scope
        and period_at(ws.period, r.created_ms, tz).id == period
    )
    return granted + request.amount_nanos <= auto.period_max_nanos


def pending_of(requests: Iterable[TopupRequest], key_id: str, now_ms: int) -> int:
    return sum(1 for r in requests if r.key_id == key_id and r.state(now_ms) == "pending")


# --- Redis -------------------------------------------------------------------------------------

# KEYS: request hash, grants hash[, auto-approval hash of the period]. ARGV: id, by, now,
# nanos, until, channel, workspace, note[, ceiling, ttl]. With the third key, the grant is
# made only if what auto-approval granted the scope this period stays within the ceiling.
_APPROVE = """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return 'unknown' end
if st ~= 'pending' then return st end
local scope = redis.call('HGET', KEYS[1], 'scope')
if KEYS[3] then
  local used = tonumber(redis.call('HGET', KEYS[3], scope) or '0')
  if used + tonumber(ARGV[4]) > tonumber(ARGV[9]) then return 'over_auto_limit' end
  redis.call('HINCRBY', KEYS[3], scope, ARGV[4])
  redis.call('EXPIRE', KEYS[3], ARGV[10])
end
redis.call('HSET', KEYS[1], 'status', 'approved', 'decided_by', ARGV[2], 'decided_ms', ARGV[3],
  'granted_nanos', ARGV[4], 'granted_until_ms', ARGV[5], 'note', ARGV[8])
redis.call('HSET', KEYS[2], ARGV[1], scope .. '|' .. ARGV[4] .. '|' .. ARGV[5])
redis.call('PUBLISH', ARGV[6], 'topup ' .. ARGV[7] .. ' ' .. ARGV[1])
return 'ok'
"""

# KEYS: request hash, grants hash. ARGV: id, by, now, channel, workspace, note, from, to, ttl.
# A pending request is denied, an approved one revoked (its grant ends now).
_END = """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return 'unknown' end
if st ~= ARGV[7] then return st end
redis.call('HSET', KEYS[1], 'status', ARGV[8], 'decided_by', ARGV[2], 'decided_ms', ARGV[3],
  'note', ARGV[6], 'ended_ms', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[9])
if redis.call('HDEL', KEYS[2], ARGV[1]) == 1 then
  redis.call('PUBLISH', ARGV[4], 'topup ' .. ARGV[5] .. ' ' .. ARGV[1])
end
return 'ok'
"""

# KEYS: grants hash. ARGV: now, request key prefix, ttl. Ends every grant whose time is up;
# returns their ids. Whoever deletes a grant reports it: each expiry is told once.
_EXPIRE = """
local out = {}
local all = redis.call('HGETALL', KEYS[1])
local now = tonumber(ARGV[1])
for i = 1, #all, 2 do
  local id, v = all[i], all[i + 1]
  local until_ms = tonumber(string.match(v, '|(%d+)$'))
  if until_ms == nil or until_ms <= now then
    redis.call('HDEL', KEYS[1], id)
    local rk = ARGV[2] .. id
    if redis.call('HGET', rk, 'status') == 'approved' then
      redis.call('HSET', rk, 'status', 'expired', 'ended_ms', ARGV[1])
      redis.call('EXPIRE', rk, ARGV[3])
    end
    out[#out + 1] = id
  end
end
return out
"""


class TopupStore:
    """Requests and grants in Redis: each decision is one script that also announces it."""

    def __init__(self, client: AsyncClient, *, now_ms: Any = wall_ms) -> None:
        self.client = client
        self.now_ms = now_ms
        self._approve = client.register_script(_APPROVE)
        self._end = client.register_script(_END)
        self._expire = client.register_script(_EXPIRE)

    async def add(self, request: TopupRequest) -> None:
        """Store a new request (pending)."""
        ws = request.workspace
        await self.client.hset(TOPUP_INDEX, request.request_id, ws)
        await self.client.hset(
            topup_request_key(ws, request.request_id),
            mapping=request.as_fields(),  # type: ignore[arg-type]
        )
        await self.client.zadd(topup_requests_key(ws), {request.request_id: request.created_ms})

    async def get(self, request_id: str) -> TopupRequest | None:
        ws = await self.client.hget(TOPUP_INDEX, request_id[:64])
        if ws is None:
            return None
        raw = await self.client.hgetall(topup_request_key(_text(ws), request_id))
        return TopupRequest.from_fields(raw)

    async def list(self, workspace: str, limit: int = 200) -> list[TopupRequest]:
        """The workspace's requests, newest first."""
        ids = await self.client.zrevrange(topup_requests_key(workspace), 0, limit - 1)
        if not ids:
            return []
        async with self.client.pipeline(transaction=False) as pipe:
            for rid in ids:
                pipe.hgetall(topup_request_key(workspace, _text(rid)))
            rows = await pipe.execute()
        found = [TopupRequest.from_fields(row) for row in rows]
        gone = [_text(rid) for rid, req in zip(ids, found, strict=True) if req is None]
        if gone:  # decided long ago and expired: forget the id too
            await self.client.zrem(topup_requests_key(workspace), *gone)
        return [r for r in found if r is not None]

    async def grants(self, workspace: str) -> tuple[Grant, ...]:
        return grants_from(await self.client.hgetall(topups_key(workspace)))

    async def approve(
        self,
        request_id: str,
        by: str,
        *,
        nanos: int | None = None,
        until_ms: int | None = None,
        note: str = "",
        auto_ceiling: tuple[str, int, int] | None = None,
    ) -> TopupRequest:
        """Grant a pending request (an approver may grant less, or for less long).

        `auto_ceiling` (period id, ceiling nanos, seconds to keep the count): granted by
        auto-approval, only while its grants to the scope this period stay within the
        ceiling, checked and counted in the approve script itself (TopupError otherwise)."""
        request = await self._pending(request_id)
        now = self.now_ms()
        nanos = request.amount_nanos if nanos is None else nanos
        until = request.until_ms if until_ms is None else until_ms
        if not 0 < nanos <= request.amount_nanos:
            asked = usd_for_people(request.amount_nanos)
            raise TopupError(f"amount_usd: grant more than $0 and at most the {asked} asked")
        if not now < until <= request.until_ms:
            raise TopupError("until: must be in the future and no later than asked")
        ws = request.workspace
        keys = [topup_request_key(ws, request_id), topups_key(ws)]
        args: list[Any] = [request_id, by, now, nanos, until, KEYS_CHANNEL, ws, note]
        if auto_ceiling is not None:
            period_id, ceiling, keep_s = auto_ceiling
            keys.append(topup_auto_key(ws, period_id))
            args += [ceiling, keep_s]
        result = _text(await self._approve(keys=keys, args=args))
        return await self._after(request_id, result)

    async def deny(self, request_id: str, by: str, note: str = "") -> TopupRequest:
        await self._pending(request_id)
        return await self._finish(request_id, by, note, "pending", "denied")

    async def revoke(self, request_id: str, by: str, note: str = "") -> TopupRequest:
        """End an approved grant now."""
        return await self._finish(request_id, by, note, "approved", "revoked")

    async def expire(self, workspace: str, now_ms: int) -> list[TopupRequest]:
        """End the grants whose time is up; the requests this call ended (each once)."""
        ids = await self._expire(
            keys=[topups_key(workspace)],
            args=[now_ms, topup_request_key(workspace, ""), KEEP_DECIDED_S],
        )
        out = []
        for rid in ids or ():
            request = await self.get(_text(rid))
            if request is not None:
                out.append(request)
        return out

    async def _pending(self, request_id: str) -> TopupRequest:
        request = await self.get(request_id)
        if request is None:
            raise TopupError(f"unknown top-up request {request_id[:64]!r}")
        state = request.state(self.now_ms())
        if state != "pending":
            raise TopupError(f"{request_id} is {state}, not pending")
        return request

    async def _finish(
        self, request_id: str, by: str, note: str, was: str, becomes: str
    ) -> TopupRequest:
        request = await self.get(request_id)
        if request is None:
            raise TopupError(f"unknown top-up request {request_id[:64]!r}")
        ws = request.workspace
        args = [request_id, by, self.now_ms(), KEYS_CHANNEL, ws, note, was, becomes]
        result = _text(
            await self._end(
                keys=[topup_request_key(ws, request_id), topups_key(ws)],
                args=[*args, KEEP_DECIDED_S],
            )
        )
        return await self._after(request_id, result)

    async def _after(self, request_id: str, result: str) -> TopupRequest:
        if result == "over_auto_limit":
            raise AutoLimitReached(f"{request_id}: auto-approval's ceiling for the period")
        if result != "ok":
            raise TopupError(f"{request_id} is {result}")
        request = await self.get(request_id)
        assert request is not None
        return request
