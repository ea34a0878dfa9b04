"""The runaway breaker's rules: which shapes of traffic mean a key has run away.

"One rogue script away from exhausting your monthly budget in a weekend": a CI bot in a
retry loop, an agent re-sending the same context every few seconds, a session that never
compacts its history. Budgets stop a workspace only at its hard limit, and the burn-rate
watch speaks about a workspace once the spike shows at workspace scale. The breaker looks at
each key, and pauses the one that runs away (see `governance.pauses`).

Three rules, each with thresholds in the policy (`breaker:`, see docs/topups.md):

* repeats: the same request (its fingerprint, made beside the cache-hygiene prefix's from
  the model and every input text, see `insight.cachehygiene`) more than N times within M
  minutes.
  Only requests of 1,024 counted tokens and more count: a health check sending "ping" every
  ten seconds is not a runaway, and costs nothing worth stopping.
* spend rate: what the key spent in the last M minutes, at that pace for an hour, is more
  than X times its busiest hour of the last seven days, and at least a floor in dollars.
  A key without a busy hour to compare with (new, or idle all week) is not judged by rate.
* session growth: a session whose per-turn input grew on each of its last N turns and has
  passed a ceiling of tokens per turn: an agent that re-sends an ever longer history and
  never compacts it (Codex compacts before its model's context is full).

`Detector` is a plain object fed records in time order, with the records' own clock: the
same code runs in the watch on live traffic (`insight.runaway`) and over recorded traffic
(tests, the what-if replay), at any speed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from itertools import pairwise
from typing import Any

from extproc.governance.policy import Breaker
from extproc.metering.prices import usd, usd_for_people
from extproc.v1.ledger_pb2 import UsageRecord

MIN_REPEAT_TOKENS = 1024
"""Requests smaller than this never count as repeats (the prompt cache's own minimum)."""
RULES = ("repeats", "spend_rate", "session_growth")
SESSIONS_PER_KEY = 64
"""Sessions followed per key at once (the least recently active is dropped first)."""


@dataclass(frozen=True, slots=True)
class Seen:
    """What the breaker reads of one ledger record."""

    time_ms: int
    workspace: str
    key_id: str
    service: str
    session_id: str
    shape: tuple[str, str, int] | None  # (fingerprint, model, input tokens); None: too small
    input_tokens: int
    cost_nanos: int

    @staticmethod
    def of(record: UsageRecord) -> Seen | None:
        """None for what the breaker ignores: refusals (they cost nothing), unattributed
        traffic, adjustments."""
        if not record.key_id or record.outcome in ("rejected", "adjustment"):
            return None
        tokens = record.counted_input_tokens or record.input_tokens
        model = record.model_requested or record.model_served
        shape = None
        if tokens >= MIN_REPEAT_TOKENS and record.request_fingerprint:
            shape = (record.request_fingerprint, model, tokens)
        return Seen(
            record.time_ms,
            record.workspace,
            record.key_id,
            record.service,
            record.session_id,
            shape,
            tokens,
            record.cost_nanos,
        )


@dataclass(frozen=True, slots=True)
class Trip:
    workspace: str
    key_id: str
    service: str
    rule: str  # one of RULES
    at_ms: int
    mode: str  # "enforce" or "dry_run"
    why: str  # for people: what was seen, against which threshold
    details: dict[str, Any]


@dataclass
class _Key:
    workspace: str
    service: str
    shapes: dict[tuple[str, str, int], deque[int]] = field(default_factory=dict)
    spend: deque[tuple[int, int]] = field(default_factory=deque)
    spend_total: int = 0
    sessions: dict[str, deque[int]] = field(default_factory=dict)
    tripped: dict[str, int] = field(default_factory=dict)  # rule -> until when it stays quiet
    last_ms: int = 0


class Detector:
    """Per key, the recent traffic the rules need; `feed` returns the trips it causes.

    `rules(workspace, service)` gives a caller's thresholds (the live policy's). A key that
    tripped a rule is not reported for that rule again within the rule's window; `forget`
    starts a key over (after a resume), and only records after `since_ms` count then.
    """

    def __init__(self, rules: Callable[[str, str], Breaker | None]) -> None:
        self._rules = rules
        self._keys: dict[str, _Key] = {}
        self._since: dict[str, int] = {}
        self.now_ms = 0

    def __len__(self) -> int:
        return len(self._keys)

    def forget(self, key_id: str, since_ms: int) -> None:
        self._keys.pop(key_id, None)
        self._since[key_id] = max(self._since.get(key_id, 0), since_ms)

    def feed(self, seen: Seen) -> list[Trip]:
        rules = self._rules(seen.workspace, seen.service)
        if rules is None or rules.mode == "off" or seen.time_ms <= self._since.get(seen.key_id, 0):
            return []
        self.now_ms = max(self.now_ms, seen.time_ms)
        state = self._keys.get(seen.key_id)
        if state is None:
            state = self._keys[seen.key_id] = _Key(seen.workspace, seen.service)
        state.last_ms = max(state.last_ms, seen.time_ms)
        trips = []
        for check in (self._repeats, self._growth):
            trip = check(state, seen, rules)
            if trip is not None:
                trips.append(trip)
        self._spend(state, seen, rules)
        return trips

    # -- repeats --------------------------------------------------------------------------

    def _repeats(self, state: _Key, seen: Seen, rules: Breaker) -> Trip | None:
        limit = rules.repeat_more_than
        if limit is None or seen.shape is None:
            return None
        window = rules.repeat_minutes * 60_000
        times = state.shapes.setdefault(seen.shape, deque())
        times.append(seen.time_ms)
        while times and times[0] <= seen.time_ms - window:
            times.popleft()
        if len(times) <= limit or self._quiet(state, "repeats", seen.time_ms):
            return None
        state.tripped["repeats"] = seen.time_ms + window
        fingerprint, model, tokens = seen.shape
        return self._trip(
            seen,
            rules,
            "repeats",
            f"the same {tokens:,}-token request on {model} was sent {len(times)} times in "
            f"{_minutes(seen.time_ms - times[0])} (the limit is {limit} in "
            f"{rules.repeat_minutes} minutes)",
            {"count": len(times), "limit": limit, "minutes": rules.repeat_minutes,
             "input_tokens": tokens, "model": model, "fingerprint": fingerprint},
        )  # fmt: skip

    # -- session growth ---------------------------------------------------------------------

    def _growth(self, state: _Key, seen: Seen, rules: Breaker) -> Trip | None:
        ceiling = rules.growth_tokens
        if ceiling is None or not seen.session_id:
            return None
        turns = state.sessions.pop(seen.session_id, None)
        if turns is None:
            turns = deque(maxlen=rules.growth_turns + 1)
            if len(state.sessions) >= SESSIONS_PER_KEY:
                del state.sessions[next(iter(state.sessions))]
        state.sessions[seen.session_id] = turns  # most recently active last
        turns.append(seen.input_tokens)
        if len(turns) < rules.growth_turns + 1 or seen.input_tokens <= ceiling:
            return None
        listed = list(turns)
        if any(b <= a for a, b in pairwise(listed)):
            return None
        if self._quiet(state, f"session_growth:{seen.session_id}", seen.time_ms):
            return None
        state.tripped[f"session_growth:{seen.session_id}"] = seen.time_ms + 3_600_000
        return self._trip(
            seen,
            rules,
            "session_growth",
            f"session {seen.session_id[:40]} re-sent more input on each of its last "
            f"{rules.growth_turns} turns, now {seen.input_tokens:,} tokens per turn (the "
            f"ceiling is {ceiling:,})",
            {"session_id": seen.session_id, "input_tokens": listed, "ceiling": ceiling,
             "turns": rules.growth_turns},
        )  # fmt: skip

    # -- spend rate -------------------------------------------------------------------------

    def _spend(self, state: _Key, seen: Seen, rules: Breaker) -> None:
        state.spend.append((seen.time_ms, seen.cost_nanos))
        state.spend_total += seen.cost_nanos
        window = rules.rate_minutes * 60_000
        while state.spend and state.spend[0][0] <= seen.time_ms - window:
            state.spend_total -= state.spend.popleft()[1]

    def rate_candidates(self) -> list[tuple[str, str, str]]:
        """(workspace, service, key id) of keys that spent at least the rate rule's floor in
        its window: the only ones whose baseline is worth reading."""
        out = []
        for key_id, state in self._keys.items():
            if not state.spend:
                continue
            ws, svc = state.workspace, state.service
            rules = self._rules(ws, svc)
            if rules is None or rules.mode == "off" or rules.rate_multiple is None:
                continue
            if state.spend_total >= max(rules.rate_min_nanos, 1) and not self._quiet(
                state, "spend_rate", self.now_ms
            ):
                out.append((ws, svc, key_id))
        return out

    def check_rate(
        self, workspace: str, service: str, key_id: str, baseline: int | None
    ) -> Trip | None:
        """The spend-rate rule for one candidate, given its busiest hour (None: no history)."""
        state = self._keys.get(key_id)
        rules = self._rules(workspace, service)
        if state is None or rules is None or rules.rate_multiple is None or not baseline:
            return None
        pace = Fraction(state.spend_total * 60, rules.rate_minutes)
        if pace <= rules.rate_multiple * baseline:
            return None
        now = self.now_ms
        state.tripped["spend_rate"] = now + rules.rate_minutes * 60_000
        ratio = Decimal(pace.numerator) / pace.denominator / baseline
        seen = Seen(now, workspace, key_id, service, "", None, 0, 0)
        return self._trip(
            seen,
            rules,
            "spend_rate",
            f"it spent {usd_for_people(state.spend_total)} in the last {rules.rate_minutes} "
            f"minutes, {usd_for_people(int(pace))} an hour at that pace: "
            f"{ratio.quantize(Decimal('0.1'))}x its busiest hour of the last 7 days "
            f"({usd_for_people(baseline)}; the limit is {rules.rate_multiple}x)",
            {"spent_usd": usd(state.spend_total), "minutes": rules.rate_minutes,
             "pace_usd_per_hour": usd(int(pace)), "baseline_usd_per_hour": usd(baseline),
             "multiple": str(rules.rate_multiple)},
        )  # fmt: skip

    # -- upkeep -----------------------------------------------------------------------------

    def _trip(
        self, seen: Seen, rules: Breaker, rule: str, why: str, details: dict[str, Any]
    ) -> Trip:
        return Trip(
            seen.workspace, seen.key_id, seen.service, rule, seen.time_ms, rules.mode, why, details
        )

    @staticmethod
    def _quiet(state: _Key, rule: str, now_ms: int) -> bool:
        return state.tripped.get(rule, 0) > now_ms

    def prune(self, now_ms: int, keep_ms: int) -> None:
        """Drop keys idle for longer than `keep_ms` (every rule's window has passed)."""
        for key_id in [k for k, s in self._keys.items() if s.last_ms <= now_ms - keep_ms]:
            del self._keys[key_id]


def _minutes(ms: int) -> str:
    seconds = max(ms, 0) // 1000
    if seconds < 120:
        return f"{seconds} seconds"
    return f"{seconds // 60} minutes"
