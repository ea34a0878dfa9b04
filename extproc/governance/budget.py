"""Budgets and rate limits: what a request must reserve, and asking Redis for it.

`plan_request` is a plain function of the policy, the caller and the request: which
scopes (workspace, team, service, key) it is charged to, their caps, its rate limits,
and the worst-case cost to hold (counted input plus the output cap, priced). `Budgets`
holds that worst case before the request is forwarded: a caller that is busy on this
replica gets a lease (`governance.lease`: a slice of the caps' room admitted against
locally, one orphan write per request), anyone else one script call per request
(reserve.lua). The settlement after the response rides with the ledger write (see
`ledger`), batched per workspace.

When Redis is unreachable each workspace chooses: fail closed (503) or fail open, in
which case the sidecar keeps local books (last known spend plus what it admitted since)
and still refuses what would clearly break a hard cap; the settlements wait in the spool
and reach Redis when it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any
from zoneinfo import ZoneInfo

from extproc.governance.keys import Identity
from extproc.governance.lease import Leases, is_lease
from extproc.governance.periods import Period, period_at
from extproc.governance.policy import Policy, RateLimits, Service, Team, Workspace
from extproc.metering.orphans import Orphan
from extproc.metering.prices import PriceTable
from extproc.metering.settlement import UNGOVERNED, Charged
from extproc.store.clients import UNAVAILABLE, ScriptClient
from extproc.store.schema import (
    KEYS_CHANNEL,
    LEASES_NOTICE,
    WORKSPACE_SCOPE,
    bounded_session,
    key_scope,
    lease_expiry_key,
    reservations_key,
    service_scope,
    team_scope,
    workspace_prefix,
)
from extproc.store.scripts import REAP, RESERVE
from extproc.wire.billing import NO_TOOL_REQUEST, ToolRequest

log = logging.getLogger("extproc.governance.budget")

RESERVATION_TTL_MS = 120 * 1000
"""How long a hold lives unless its sidecar renews it (`hold_expiry_seconds` overrides).

A live sidecar renews the holds of its requests in flight every quarter of this, so a
streamed agent turn can run for hours; a hold that expires belongs to a sidecar that died
or hung, and any replica's reaper then writes its estimated record and releases it."""
REAP_BATCH = 100


@dataclass(frozen=True, slots=True)
class ScopeLimit:
    scope: str  # Redis field: "ws", "team:platform", "svc:codex-cli", "key:key_ab12"
    label: str  # for people: "workspace dev", "service dev/codex-cli"
    budget_nanos: int | None
    soft_nanos: int | None
    hard_nanos: int | None
    # Of hard_nanos, what live top-up grants add (governance.topups.with_topups).
    topup_nanos: int = 0


@dataclass(frozen=True, slots=True)
class RateScope:
    scope: str
    label: str
    rpm: int | None
    tpm: int | None


@dataclass(frozen=True, slots=True)
class Plan:
    workspace: str
    prefix: str
    period: Period
    key_id: str
    scopes: tuple[ScopeLimit, ...]  # every scope the cost is attributed to
    rates: tuple[RateScope, ...]
    reserve_nanos: int
    tokens: int  # what the request counts against tokens-per-minute limits
    counted_input: int = 0  # the request's input tokens (the session guard adds them up)
    service: str = ""
    # What its settlement charges: each scope and its soft limit, derived with the scopes
    # (an overdraft raises hard caps only, so it stays right); () derives it from `scopes`.
    charged: tuple[Charged, ...] = ()


def scaled_limit(budget: int | None, ws: Workspace, limit_nanos: int) -> int | None:
    """A team's or service's limit at the same fraction of its budget as its workspace's."""
    if budget is None:
        return None
    return budget * limit_nanos // ws.budget_nanos if ws.budget_nanos else budget


def _team_and_service(ws: Workspace, identity: Identity) -> tuple[Team | None, Service | None]:
    service = ws.services.get(identity.service)
    # The policy's current team for the service wins over the one stamped on the key.
    team_name = (service.team if service and service.team else None) or identity.team
    return (ws.teams.get(team_name) if team_name else None), service


def charged_scopes(ws: Workspace, identity: Identity) -> tuple[ScopeLimit, ...]:
    """Every scope a caller's spend counts against: workspace, team, service, key.

    The one scope builder: the reservation and the settlement must name the same scopes,
    or spend reaches a budget the reservation never checked (or misses one it did).
    """
    team, service = _team_and_service(ws, identity)
    scopes = [
        ScopeLimit(
            WORKSPACE_SCOPE, f"workspace {ws.name}", ws.budget_nanos, ws.soft_nanos, ws.hard_nanos
        )
    ]
    if team is not None:
        scopes.append(
            ScopeLimit(
                team_scope(team.name),
                f"team {ws.name}/{team.name}",
                team.budget_nanos,
                scaled_limit(team.budget_nanos, ws, ws.soft_nanos),
                scaled_limit(team.budget_nanos, ws, ws.hard_nanos),
            )
        )
    if service is not None:
        scopes.append(
            ScopeLimit(
                service_scope(service.name),
                f"service {ws.name}/{service.name}",
                service.budget_nanos,
                scaled_limit(service.budget_nanos, ws, ws.soft_nanos),
                scaled_limit(service.budget_nanos, ws, ws.hard_nanos),
            )
        )
    key = key_scope(identity.key_id)
    scopes.append(ScopeLimit(key, f"key {identity.key_id}", None, None, None))
    return tuple(scopes)


def _rates(ws: Workspace, identity: Identity) -> tuple[RateScope, ...]:
    team, service = _team_and_service(ws, identity)
    candidates: list[tuple[str, str, RateLimits | None]] = [
        (WORKSPACE_SCOPE, f"workspace {ws.name}", ws.rate_limits)
    ]
    if team is not None:
        candidates.append((team_scope(team.name), f"team {ws.name}/{team.name}", team.rate_limits))
    key_limits = ws.key_rate_limits
    if service is not None:
        label = f"service {ws.name}/{service.name}"
        candidates.append((service_scope(service.name), label, service.rate_limits))
        key_limits = service.key_rate_limits  # already merged: defaults -> workspace -> service
    candidates.append((key_scope(identity.key_id), f"key {identity.key_id}", key_limits))
    return tuple(
        RateScope(scope, label, limits.rpm, limits.tpm)
        for scope, label, limits in candidates
        if limits is not None and (limits.rpm is not None or limits.tpm is not None)
    )


def attribution(
    policy: Policy, identity: Identity
) -> tuple[tuple[ScopeLimit, ...], tuple[RateScope, ...], tuple[Charged, ...]]:
    """The caller's charged scopes, its rate limits and what its settlements charge.

    All three are a pure function of the policy and the caller, yet every request needs
    them: built once per caller and kept in the policy's memo, which a reload replaces (see
    `Policy.remember`). The whole Identity is the key, so two keys never share an entry.
    """
    return policy.remember("budget.attribution", identity, _attribution, policy, identity)


def _attribution(
    policy: Policy, identity: Identity
) -> tuple[tuple[ScopeLimit, ...], tuple[RateScope, ...], tuple[Charged, ...]]:
    ws = policy.workspaces[identity.workspace]
    scopes = charged_scopes(ws, identity)
    return scopes, _rates(ws, identity), _charges(scopes)


def _charges(scopes: tuple[ScopeLimit, ...]) -> tuple[Charged, ...]:
    return tuple(Charged(s.scope, s.soft_nanos) for s in scopes)


def plan_request(
    policy: Policy,
    identity: Identity,
    *,
    model: str,
    counted_input: int,
    output_cap: int | None,
    prices: PriceTable,
    now_ms: int,
    choices: int = 1,
    service_tier: str | None = None,
    tools: ToolRequest = NO_TOOL_REQUEST,
) -> Plan:
    """What one request must reserve: its input plus its worst-case output, priced.

    `output_cap` is per output (as the API defines it) and `choices` outputs are made
    (`n`, `best_of`), so the hold covers `output_cap * choices` output tokens. Without a
    cap, `default_output_cap` is the guess for the whole request when the workspace
    enforces it (`enforce_output_cap` then writes a per-choice share of it into the body,
    see `per_choice_cap`), and a guess per output otherwise. The service tier asked for
    and the built-in tools enabled (`tools`: `max_tool_calls` of the dearest, else the
    workspace's `pricing.tool_calls` of each) are held too (`PriceTable.reserve_nanos`).
    """
    ws = policy.workspaces[identity.workspace]
    period = period_at(ws.period, now_ms, policy.timezone)
    if output_cap is not None:
        cap = output_cap * choices
    elif ws.enforce_output_cap:
        cap = per_choice_cap(ws.default_output_cap, choices) * choices
    else:
        cap = ws.default_output_cap * choices
    reserve = prices.reserve_nanos(
        model,
        counted_input,
        cap,
        service_tier=service_tier,
        tools=tools,
        tool_calls=ws.pricing.tool_calls,
    )
    scopes, rates, charged = attribution(policy, identity)
    return Plan(
        workspace=ws.name,
        prefix=workspace_prefix(ws.name),
        period=period,
        key_id=identity.key_id,
        scopes=scopes,
        rates=rates,
        reserve_nanos=reserve,
        tokens=counted_input + cap,
        counted_input=counted_input,
        service=identity.service,
        charged=charged,
    )


def per_choice_cap(total: int, choices: int) -> int:
    """The output cap to write per output so that `choices` outputs stay within `total`."""
    return max(total // max(choices, 1), 1)


_UNGOVERNED_PREFIX = workspace_prefix("")


def charges_for(
    policy: Policy | None, identity: Identity | None, plan: Plan | None, now_ms: int, tz: ZoneInfo
) -> tuple[tuple[Charged, ...], str, str]:
    """Where a finished request's cost counts: the scopes, the budget period it counts in,
    and the workspace's Redis prefix (the plan's, derived once with it).

    With a plan: the scopes its reservation checked. Forwarded without one (`bad_request:
    pass`, a refusal): the same scopes a reservation would have checked, its team's
    included. Unattributed traffic: the workspace scope of the unattributed books, by month.
    """
    if plan is not None:
        return plan.charged or _charges(plan.scopes), plan.period.id, plan.prefix
    ws = policy.workspaces.get(identity.workspace) if policy and identity else None
    if ws is None or identity is None or policy is None:
        return UNGOVERNED, period_at("month", now_ms, tz).id, _UNGOVERNED_PREFIX
    charged = attribution(policy, identity)[2]
    return charged, period_at(ws.period, now_ms, tz).id, workspace_prefix(ws.name)


def with_overdraft(plan: Plan, nanos: int) -> Plan:
    """The same plan with every hard cap raised by the overdraft (the cheap model's room)."""
    scopes = tuple(
        replace(s, hard_nanos=s.hard_nanos + nanos) if s.hard_nanos is not None else s
        for s in plan.scopes
    )
    return replace(plan, scopes=scopes)


def with_topups(plan: Plan, topups: Mapping[str, int]) -> Plan:
    """The plan with each capped scope's hard limit raised by its live top-up grants
    (scope -> nanos, see `governance.topups`): the cap is the policy's plus theirs."""
    if not topups:
        return plan
    scopes = tuple(
        replace(s, hard_nanos=s.hard_nanos + add, topup_nanos=add)
        if s.hard_nanos is not None and (add := topups.get(s.scope, 0))
        else s
        for s in plan.scopes
    )
    return replace(plan, scopes=scopes)


def overdraft_left(denial: Decision, overdraft_nanos: int) -> int:
    """What remains of the overdraft beyond the hard cap that refused the request."""
    scope = denial.denied
    standing = denial.standings[0] if denial.standings else None
    if not isinstance(scope, ScopeLimit) or scope.hard_nanos is None or standing is None:
        return 0
    used = standing.spent_nanos + standing.held_nanos
    return max(scope.hard_nanos + overdraft_nanos - used, 0)


def remaining_nanos(hard_nanos: int, spent_nanos: int, held_nanos: int) -> int:
    """What a scope has left, the one meaning of "remaining" (headers, /me, reports): up
    to the hard limit, where calls are refused, less what is spent and what in-flight calls
    hold; never below zero."""
    return max(hard_nanos - spent_nanos - held_nanos, 0)


@dataclass(frozen=True, slots=True)
class Standing:
    """Where one capped scope stood when the request was admitted."""

    scope: ScopeLimit
    spent_nanos: int
    held_nanos: int

    @property
    def left_nanos(self) -> int:
        """What is left before the hard limit refuses (`remaining_nanos`)."""
        return remaining_nanos(self.scope.hard_nanos or 0, self.spent_nanos, self.held_nanos)

    @property
    def over_soft(self) -> bool:
        soft = self.scope.soft_nanos
        return soft is not None and self.spent_nanos >= soft


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: str  # "ok", "budget", "rate", "revoked", "redis_down", "ok_local"
    reservation_id: str = ""
    denied: ScopeLimit | RateScope | None = None
    retry_after_ms: int = 0
    limit_kind: str = ""  # "rpm" / "tpm" for rate denials
    limit: int = 0
    standings: tuple[Standing, ...] = ()
    first_denial: bool = False
    session_tokens: int = 0  # the session's input tokens so far, this request included

    @property
    def over_soft(self) -> bool:
        return any(s.over_soft for s in self.standings)

    @property
    def binding(self) -> Standing | None:
        """The capped scope with the smallest share of its hard limit left: the one that
        will stop the caller."""
        capped = [s for s in self.standings if s.scope.hard_nanos]
        if not capped:
            return None
        return min(
            capped,
            key=lambda s: (s.left_nanos / s.scope.hard_nanos, s.left_nanos),  # type: ignore[operator]
        )


def _args(
    plan: Plan,
    reservation_id: str,
    now_ms: int,
    session: str = "",
    *,
    ttl_ms: int = RESERVATION_TTL_MS,
    orphan: bytes = b"",
) -> list[Any]:
    capped = [s for s in plan.scopes if s.hard_nanos is not None]
    args: list[Any] = [
        now_ms,
        reservation_id,
        plan.reserve_nanos,
        ttl_ms,
        plan.tokens,
        plan.key_id,
        plan.period.id,
        len(capped),
    ]
    for s in capped:
        args += [s.scope, s.hard_nanos]
    args.append(len(plan.rates))
    for r in plan.rates:
        args += [r.scope, -1 if r.rpm is None else r.rpm, -1 if r.tpm is None else r.tpm]
    args += [bounded_session(session), plan.counted_input, orphan]
    return args


def standings_of(capped: tuple[ScopeLimit, ...], figures: Sequence[bytes]) -> tuple[Standing, ...]:
    """Standings from a script's (spent, held) per capped scope, in order."""
    return tuple(
        Standing(s, int(figures[2 * i]), int(figures[2 * i + 1])) for i, s in enumerate(capped)
    )


def decide(plan: Plan, reservation_id: str, reply: list[bytes], now_ms: int) -> Decision:
    """Turn the reserve script's reply into a decision (pure)."""
    kind = reply[0].decode()
    if kind == "ok":
        capped = tuple(s for s in plan.scopes if s.hard_nanos is not None)
        standings = standings_of(capped, reply[1:])
        at = 1 + 2 * len(capped)
        session = int(reply[at]) if len(reply) > at else 0
        return Decision(True, "ok", reservation_id, standings=standings, session_tokens=session)
    if kind == "revoked":
        return Decision(False, "revoked")
    if kind == "rate":
        rate_scope = reply[1].decode()
        rate = next(r for r in plan.rates if r.scope == rate_scope)
        return Decision(
            False,
            "rate",
            denied=rate,
            limit_kind=reply[2].decode(),
            retry_after_ms=int(reply[3]),
            limit=int(reply[4]),
        )
    denied = reply[1].decode()
    scope = next(s for s in plan.scopes if s.scope == denied)
    standing = Standing(scope, int(reply[2]), int(reply[3]))
    return Decision(
        False,
        "budget",
        denied=scope,
        retry_after_ms=max(plan.period.end_ms - now_ms, 0),
        standings=(standing,),
        first_denial=reply[4] == b"1",
    )


class Budgets:
    """Reserve-before-forward against Redis, with each workspace's Redis-outage policy."""

    def __init__(
        self,
        client: ScriptClient,
        *,
        hold_ttl_ms: int = RESERVATION_TTL_MS,
        topups: Callable[[str, int], Mapping[str, int]] | None = None,
        topups_until: Callable[[str, int], int] | None = None,
        leases: bool = True,
    ) -> None:
        self._redis = client
        self.hold_ttl_ms = hold_ttl_ms
        # A workspace's live top-ups at a time (scope -> nanos), from the sidecar's cache
        # (`governance.live`): they raise the hard limits each hold and each lease grant or
        # refresh checks (the scripts take the caps as given: top-ups count once, here).
        self.topups = topups
        # When the first of those top-ups ends (0: none): a lease granted on a cap that
        # counts one admits no longer than that.
        self.topups_until = topups_until
        # Holds (and leases) this process owns and has not settled (returned) yet, by
        # workspace prefix: renewed until the ledger has written their settlement.
        self._owned: defaultdict[str, set[str]] = defaultdict(set)
        # Fail-open books: last known spend+held per (prefix, period, scope), plus what this
        # process admitted while Redis was away.
        self._known: dict[tuple[str, str, str], int] = {}
        self._local: defaultdict[tuple[str, str, str], int] = defaultdict(int)
        self._levels: dict[tuple[str, str], str] = {}
        self.leases: Leases | None = None
        if leases:
            self.leases = Leases(
                client, hold_ttl_ms=hold_ttl_ms, owned=self._own, standings=standings_of
            )
        self._reclaimed: dict[str, float] = {}  # workspace -> when room was last asked for
        self._tasks: set[asyncio.Task[None]] = set()

    def level(self, identity: Identity) -> str:
        """'soft' once the caller's last reservation found a budget past its soft limit.

        Routing must pick the model before the reservation (the model sets the price), so
        it uses where the caller stood last time; the hard limit is always checked fresh.
        """
        return self._levels.get((identity.workspace, identity.service), "ok")

    async def reserve(
        self,
        plan: Plan,
        fail_open: bool,
        now_ms: int,
        *,
        session: str = "",
        orphan: bytes | Orphan = b"",
        exact: bool = False,
    ) -> Decision:
        """Hold the plan's worst case. `orphan` is what any replica bills if this request's
        sidecar dies before settling it (see `reap`): a compact `Orphan` (metering.orphans),
        which lets a busy caller's request be admitted under a lease, or a serialized
        settlement (held exactly). `exact`: never under a lease (an overdraft's retry).
        Live top-ups raise the plan's hard limits first (`with_topups`)."""
        caller, until_ms = plan, 0
        if self.topups is not None:
            granted = self.topups(plan.workspace, now_ms)
            if granted:
                plan = with_topups(plan, granted)
                if self.topups_until is not None:
                    until_ms = self.topups_until(plan.workspace, now_ms)
        leases = self.leases
        blob = orphan.encode() if isinstance(orphan, Orphan) else orphan  # once, either way
        if leases is not None and not exact and isinstance(orphan, Orphan):
            try:
                admitted = await leases.admit(
                    plan,
                    now_ms,
                    blob,
                    orphan.request_id,
                    session,
                    base=caller,
                    until_ms=until_ms,
                )
            except UNAVAILABLE as exc:
                log.warning("budget: redis unavailable for %s (%s)", plan.workspace, exc)
                return self._reserve_locally(plan) if fail_open else Decision(False, "redis_down")
            if admitted is not None:
                lease, session_tokens = admitted
                decision = Decision(
                    True, "ok", lease.id, standings=lease.standings, session_tokens=session_tokens
                )
                self._admitted(plan, decision)
                return decision
        rid = os.urandom(16).hex()  # opaque, as random as a uuid4, a third of its CPU
        args = _args(plan, rid, now_ms, session, ttl_ms=self.hold_ttl_ms, orphan=blob)
        try:
            reply = await RESERVE(self._redis, [plan.prefix], args)
        except UNAVAILABLE as exc:
            log.warning("budget: redis unavailable for %s (%s)", plan.workspace, exc)
            return self._reserve_locally(plan) if fail_open else Decision(False, "redis_down")
        decision = decide(plan, rid, reply, now_ms)
        if decision.allowed:
            self._owned[plan.prefix].add(rid)
            self._admitted(plan, decision)
        elif decision.reason == "budget" and leases is not None:
            self._reclaim(plan, decision)
        return decision

    def _admitted(self, plan: Plan, decision: Decision) -> None:
        if plan.service:
            self._levels[(plan.workspace, plan.service)] = "soft" if decision.over_soft else "ok"
        # Fresh figures replace the local books of these scopes only: admissions made for
        # other workspaces while Redis was away are not in any figure yet.
        for st in decision.standings:
            key = (plan.prefix, plan.period.id, st.scope.scope)
            self._known[key] = st.spent_nanos + st.held_nanos + plan.reserve_nanos
            self._local.pop(key, None)

    def _reclaim(self, plan: Plan, denial: Decision) -> None:
        """Refused while something is held: ask every replica to hand back its leases of
        the workspace (at most once a tenth of a second), so held room that nobody uses
        comes back for whoever asks next."""
        standing = denial.standings[0] if denial.standings else None
        if standing is None or not standing.held_nanos:
            return
        now = asyncio.get_running_loop().time()
        if now - self._reclaimed.get(plan.workspace, -1.0) < 0.1:
            return
        self._reclaimed[plan.workspace] = now
        if self.leases is not None:
            self.leases.close_workspace(plan.prefix)
        self._notify(plan.workspace, "reclaim")

    def _notify(self, workspace: str, why: str) -> None:
        async def publish() -> None:
            with contextlib.suppress(*UNAVAILABLE):
                await self._redis.execute_command(
                    "PUBLISH", KEYS_CHANNEL, f"{LEASES_NOTICE} {workspace} {why}"
                )

        task = asyncio.get_running_loop().create_task(publish())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def close_workspace(self, workspace: str) -> int:
        """A limit of `workspace` was lowered (or its room asked for): close its leases here;
        each is handed back once its last request has settled. Returns how many."""
        if self.leases is None:
            return 0
        return self.leases.close_workspace(workspace_prefix(workspace))

    async def close(self) -> None:
        """Shutting down (after the ledger's last write): hand every lease back."""
        if self.leases is not None:
            await self.leases.close()

    def _reserve_locally(self, plan: Plan) -> Decision:
        standings: list[Standing] = []
        for s in plan.scopes:
            if s.hard_nanos is None:
                continue
            key = (plan.prefix, plan.period.id, s.scope)
            used = self._known.get(key, 0) + self._local[key]
            if used + plan.reserve_nanos > s.hard_nanos:
                return Decision(False, "budget", denied=s, standings=(Standing(s, used, 0),))
            standings.append(Standing(s, used, 0))
        for standing in standings:
            self._local[(plan.prefix, plan.period.id, standing.scope.scope)] += plan.reserve_nanos
        return Decision(True, "ok_local", "", standings=tuple(standings))

    # -- holds in flight: renewed while owned, reaped by anyone once expired -----------------

    def settled(
        self, prefix: str, reservation_id: str, request_id: str = "", cost_nanos: int = 0
    ) -> None:
        """The ledger wrote this request's settlement: stop renewing its hold (a lease is
        renewed until it is handed back; its request gives back `worst - cost` of it)."""
        if is_lease(reservation_id):
            if self.leases is not None:
                self.leases.settled(reservation_id, request_id, cost_nanos)
            return
        self._own(prefix, reservation_id, False)

    def _own(self, prefix: str, reservation_id: str, alive: bool) -> None:
        if alive:
            self._owned[prefix].add(reservation_id)
            return
        owned = self._owned.get(prefix)
        if owned is not None:
            owned.discard(reservation_id)
            if not owned:
                del self._owned[prefix]

    @property
    def owned(self) -> int:
        return sum(len(rids) for rids in self._owned.values())

    async def renew(self, now_ms: int) -> None:
        """Push the expiry of every hold and lease this process still owns (one command per
        workspace and kind).

        `XX`: a hold already reaped (this process was paused longer than the expiry) is not
        brought back; its estimated record stands and the late settlement is a duplicate.
        """
        expiry = now_ms + self.hold_ttl_ms
        for prefix, rids in list(self._owned.items()):
            holds: list[Any] = []
            leases: list[Any] = []
            for rid in rids:
                (leases if rid[:1] == "L" else holds).extend((expiry, rid))
            if holds:
                await self._redis.execute_command("ZADD", reservations_key(prefix), "XX", *holds)
            if leases:
                await self._redis.execute_command("ZADD", lease_expiry_key(prefix), "XX", *leases)

    async def reap(self, prefixes: Any, now_ms: int) -> list[bytes]:
        """Release expired holds of these workspaces; their estimated settlements, to write."""
        found: list[bytes] = []
        for prefix in prefixes:
            while True:
                batch = await REAP(self._redis, [prefix], [now_ms, REAP_BATCH])
                found.extend(batch)
                if len(batch) < REAP_BATCH:
                    break
        return found
