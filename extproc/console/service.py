"""What the admin API, the web console and the CLI share: one implementation of each action.

Keys go through `KeyStore` (the same calls `extproc keys` makes), the spend figures through
`extproc.insight.spend.build_report` (the same report `extproc spend --json` prints), usage
through one ledger query. Each function takes its Redis client and policy as arguments, so
the HTTP layer stays a thin translation of requests into these calls.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from extproc.governance.access import Person, personal_key_days
from extproc.governance.keys import KeyInfo, KeyStore, KeyStoreError, new_key_dict
from extproc.governance.policy import Policy, PolicyError, load_policy
from extproc.insight.spend import Report, build_report, read_hashes, report_keys, report_reads
from extproc.metering.ledger import record_to_dict
from extproc.store.schema import LEDGERS, ledger_key, workspace_prefix
from extproc.v1.ledger_pb2 import UsageRecord

USAGE_FILTERS = ("workspace", "team", "service", "key_id", "model", "outcome", "session")
PAGE_FILTERS = (*USAGE_FILTERS, "since", "until", "cursor")
"""The usage page's query parameters: the API's filters, a time range and the page cursor."""
_CURSOR = re.compile(r"\d+-\d+")
MAX_PAGE = 500
SCAN_CHUNK = 500
SCAN_CAP = 100_000
"""Ledger entries one usage query may examine: a narrow filter over a huge ledger returns a
short page and a cursor rather than holding Redis for seconds."""


@dataclass(frozen=True, slots=True)
class UsageQuery:
    workspace: str | None = None
    team: str | None = None
    service: str | None = None
    key_id: str | None = None
    model: str | None = None
    outcome: str | None = None
    session: str | None = None
    since_ms: int | None = None
    until_ms: int | None = None
    limit: int = 100
    cursor: str | None = None  # an entry id: the page starts strictly before it

    def matches(self, r: UsageRecord) -> bool:
        if self.team and r.team != self.team:
            return False
        if self.service and r.service != self.service:
            return False
        if self.key_id and r.key_id != self.key_id:
            return False
        if self.model and self.model not in (r.model_requested, r.model_served):
            return False
        if self.outcome and r.outcome != self.outcome:
            return False
        if self.session and r.session_id != self.session:
            return False
        if self.since_ms is not None and r.time_ms < self.since_ms:
            return False
        return not (self.until_ms is not None and r.time_ms >= self.until_ms)


def instant_ms(text: str, tz: Any) -> int:
    """Milliseconds of an ISO 8601 time; one without a zone is in `tz` (the policy's)."""
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"not an ISO 8601 time: {text!r}") from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=tz or UTC)
    return int(value.timestamp() * 1000)


def usage_query(form: dict[str, str], tz: Any, limit: int = 100) -> UsageQuery:
    """A UsageQuery from the usage page's form (empty fields: no filter); ValueError names
    the field that is wrong."""
    cursor = form.get("cursor") or None
    if cursor is not None and not _CURSOR.fullmatch(cursor):
        raise ValueError(f"cursor: not a page cursor: {cursor!r}")
    times: dict[str, int | None] = {}
    for name in ("since", "until"):
        text = form.get(name) or ""
        try:
            times[name] = instant_ms(text, tz) if text else None
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
    return UsageQuery(
        **{name: form.get(name) or None for name in USAGE_FILTERS},
        since_ms=times["since"],
        until_ms=times["until"],
        limit=limit,
        cursor=cursor,
    )


def _entry(entry_id: bytes | str) -> tuple[int, int]:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


async def query_usage(client: Any, q: UsageQuery) -> dict[str, Any]:
    """One page of ledger records matching `q`, newest first, and the cursor of the next."""
    if q.workspace:
        streams = [ledger_key(workspace_prefix(q.workspace))]
    else:
        streams = sorted(_text(s) for s in await client.smembers(LEDGERS))
    limit = max(1, min(q.limit, MAX_PAGE))
    top = f"({q.cursor}" if q.cursor else "+"
    if q.until_ms is not None and not q.cursor:
        top = f"({q.until_ms}-0"
    bottom = f"{q.since_ms}-0" if q.since_ms is not None else "-"
    heads: dict[str, str] = dict.fromkeys(streams, top)
    low: dict[str, tuple[int, int]] = {}
    found: list[tuple[tuple[int, int], UsageRecord]] = []
    scanned = 0
    exhausted: set[str] = set()

    def confirmed() -> list[tuple[tuple[int, int], UsageRecord]]:
        # Records are final only down to the highest of the open streams' lowest ids:
        # below it, a later chunk of another stream could still bring a newer record.
        open_ = [low[s] for s in streams if s not in exhausted and s in low]
        if len(open_) < len(streams) - len(exhausted):
            return []
        mark = max(open_, default=(-1, -1))
        return [row for row in found if row[0] >= mark]

    while len(exhausted) < len(streams) and scanned < SCAN_CAP:
        for stream in streams:
            if stream in exhausted:
                continue
            rows = await client.xrevrange(stream, max=heads[stream], min=bottom, count=SCAN_CHUNK)
            if len(rows) < SCAN_CHUNK:
                exhausted.add(stream)
            scanned += len(rows)
            for entry_id, fields in rows:
                record = UsageRecord.FromString(fields[b"r"])
                if q.matches(record):
                    found.append((_entry(entry_id), record))
            if rows:
                heads[stream] = f"({_text(rows[-1][0])}"
                low[stream] = _entry(rows[-1][0])
        found.sort(key=lambda row: row[0], reverse=True)
        if len(confirmed()) > limit:
            break
    final = found if len(exhausted) == len(streams) else confirmed()
    page = final[:limit]
    more = len(final) > limit or len(exhausted) < len(streams)
    cursor = f"{page[-1][0][0]}-{page[-1][0][1]}" if page and more else None
    if not page and more:
        # Nothing matched within the scan cap: continue from where the scan stopped.
        mark = max((low[s] for s in streams if s not in exhausted and s in low), default=None)
        cursor = f"{mark[0]}-{mark[1]}" if mark else None
    return {
        "records": [record_to_dict(r) for _key, r in page],
        "next_cursor": cursor,
        "scanned": scanned,
    }


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


EXPORT_DAYS = 30
EXPORT_CAP = 200_000
"""Records one export from the console may hold in memory; past it, `extproc ledger export`
(which streams) is the tool, and the answer says so."""
_EXPORT_TYPES = {"jsonl": "application/x-ndjson", "csv": "text/csv", "focus": "text/csv"}


async def export_usage(client: Any, q: UsageQuery, fmt: str) -> tuple[str, int]:
    """The records `q` selects (every page of them, oldest first) in `fmt`, and how many."""
    import io

    from extproc.books.export import write
    from extproc.insight.whatif import ledger_since

    since = q.since_ms
    if since is None:
        since = int(time.time() * 1000) - EXPORT_DAYS * 86_400_000
    records = [
        r
        for r in await ledger_since(client, since, limit=EXPORT_CAP + 1)
        if (not q.workspace or r.workspace == q.workspace) and q.matches(r)
    ]
    if len(records) > EXPORT_CAP:
        raise ValueError(
            f"more than {EXPORT_CAP} records: narrow the filters or the time range, "
            "or use `extproc ledger export`"
        )
    records.sort(key=lambda r: (r.time_ms, r.request_id))
    out = io.StringIO()
    count = write(records, fmt, out)
    return out.getvalue(), count


def export_response(body: str, fmt: str) -> Any:
    """The export as a download."""
    from fastapi import Response

    name = f"extproc-usage.{'jsonl' if fmt == 'jsonl' else 'csv'}"
    return Response(
        body,
        media_type=_EXPORT_TYPES[fmt],
        headers={"content-disposition": f'attachment; filename="{name}"'},
    )


# --- spend ---------------------------------------------------------------------------------


def spend_report(
    sync_client_factory: Callable[[], Any],
    policy: Policy,
    now: datetime | None = None,
    *,
    period: str = "current",
    by: str | None = None,
) -> Report:
    """The report of `extproc spend` (same reads, same builder): `.to_dict()` is its --json."""
    now = now or datetime.now(policy.timezone)
    from extproc.insight.spend.halt import read_halt

    keys = report_keys(policy, now, period, by)
    client = sync_client_factory()
    try:
        hashes = read_hashes(client, keys, report_reads(policy, now, period))
        halt = read_halt(client, policy, int(now.timestamp() * 1000))
    finally:
        client.close()
    return build_report(policy, hashes, now, selection=period, by=by, halt=halt)


async def spend_report_async(
    sync_client_factory: Callable[[], Any],
    policy: Policy,
    now: datetime | None = None,
    *,
    period: str = "current",
    by: str | None = None,
) -> Report:
    """`spend_report` off the event loop (the report's reads use the blocking client)."""
    return await asyncio.to_thread(
        spend_report, sync_client_factory, policy, now, period=period, by=by
    )


# --- keys ----------------------------------------------------------------------------------


async def create_key(
    store: KeyStore,
    policy: Policy | None,
    workspace: str,
    service: str,
    team: str | None = None,
    owner: str | None = None,
) -> dict[str, Any]:
    secret, identity = await store.create(workspace, service, team, owner, policy=policy)
    return new_key_dict(secret, identity)


async def rotate_key(store: KeyStore, key_id: str, overlap_seconds: float) -> dict[str, Any]:
    secret, identity = await store.rotate(key_id, overlap_seconds)
    old = await store.info(key_id)
    return new_key_dict(
        secret, identity, replaces=key_id, old_expires_ms=old.expires_ms if old else 0
    )


async def revoke_key(store: KeyStore, key_id: str) -> KeyInfo:
    return await store.revoke(key_id)


# --- personal keys -------------------------------------------------------------------------


async def mint_personal_key(
    store: KeyStore, policy: Policy | None, person: Person, workspace: str, service: str,
    days: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    """A key of `person`'s own, if the policy grants their groups one here, for at most the
    granted number of days (the most, when `days` is not given)."""
    allowed = personal_key_days(policy, person.groups, workspace, service)
    if allowed is None:
        raise KeyStoreError(f"your groups may not hold a personal key for {workspace}/{service}")
    days = allowed if days is None else days
    if not 1 <= days <= allowed:
        raise KeyStoreError(f"a personal key for {workspace}/{service} lives 1 to {allowed} days")
    expires = int(time.time() * 1000) + days * 86_400_000
    secret, identity = await store.create(
        workspace, service, None, person.label, policy=policy, expires_ms=expires,
        owner_sub=person.subject,
    )  # fmt: skip
    return new_key_dict(secret, identity, expires_ms=expires, personal=True)


async def revoke_own_key(store: KeyStore, person: Person, key_id: str) -> KeyInfo:
    """Revoke one of `person`'s personal keys (and only theirs)."""
    info = await store.info(key_id)
    if info is None or info.owner_sub != person.subject:
        raise KeyStoreError(f"{key_id} is not one of your personal keys")
    return await store.revoke(key_id)


async def keys_of(store: KeyStore, person: Person) -> list[KeyInfo]:
    """The keys issued to `person`: their personal keys and those an admin made for them."""
    named = {person.subject, *([person.email] if person.email else [])}
    return [
        k for k in await store.list() if k.owner_sub == person.subject or (
            not k.owner_sub and k.owner in named)
    ]  # fmt: skip


# --- policy --------------------------------------------------------------------------------


def validate_policy_text(text: str) -> dict[str, Any]:
    """Check a candidate policy; every problem names its field."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory(prefix="extproc-policy-") as tmp:
        path = Path(tmp) / "candidate.yaml"
        path.write_text(text, "utf-8")
        try:
            policy = load_policy(path)
        except PolicyError as exc:
            problems = [p.removeprefix(f"{path}: ") for p in exc.problems]
            return {"valid": False, "problems": problems, "warnings": []}
    return {
        "valid": True,
        "problems": [],
        "warnings": list(policy.warnings),
        "workspaces": sorted(policy.workspaces),
    }


def policy_summary(policy: Policy, text: str) -> dict[str, Any]:
    return {
        "source": policy.source,
        "timezone": policy.timezone.key,
        "workspaces": sorted(policy.workspaces),
        "text": text,
    }


def dumps(value: Any) -> str:
    return json.dumps(value, indent=2, default=str)


# --- what-if -------------------------------------------------------------------------------


async def what_if(client: Any, text: str, since_days: int) -> dict[str, Any]:
    """Replay the ledger of the last `since_days` under the candidate policy `text`."""
    import tempfile
    import time
    from pathlib import Path

    from extproc.insight.whatif import ledger_since, replay, topups_of
    from extproc.metering.prices import PriceTable

    with tempfile.TemporaryDirectory(prefix="extproc-whatif-") as tmp:
        path = Path(tmp) / "candidate.yaml"
        path.write_text(text, "utf-8")
        try:
            candidate = load_policy(path)
        except PolicyError as exc:
            problems = [p.removeprefix(f"{path}: ") for p in exc.problems]
            return {"valid": False, "problems": problems}
    since_ms = int(time.time() * 1000) - since_days * 86_400_000
    records = await ledger_since(client, since_ms)
    topups = await topups_of(client, candidate)
    result = await asyncio.to_thread(replay, candidate, records, PriceTable.load(), topups)
    return {"valid": True, "since_days": since_days, **result.to_dict()}


# --- shadow policy -------------------------------------------------------------------------


async def shadow_summary(client: Any, since_days: int = 1, recent: int = 50) -> dict[str, Any]:
    """The shadow policy's verdicts against the real ones, over the recent ledger."""
    import time
    from collections import Counter

    from extproc.insight.whatif import ledger_since
    from extproc.routing.shadow import actual

    since_ms = int(time.time() * 1000) - since_days * 86_400_000
    records = [r for r in await ledger_since(client, since_ms) if r.shadow]
    pairs: Counter[tuple[str, str]] = Counter()
    differ = []
    for r in records:
        real = actual(r)
        pairs[(real, r.shadow)] += 1
        if real != r.shadow:
            differ.append((r, real))
    differ.sort(key=lambda item: item[0].time_ms, reverse=True)
    return {
        "since_days": since_days,
        "compared_requests": len(records),
        "agreeing_requests": sum(n for (a, b), n in pairs.items() if a == b),
        "pairs": [{"actual": a, "shadow": b, "requests": n} for (a, b), n in pairs.most_common()],
        "recent_differences": [
            {**record_to_dict(r), "actual": real} for r, real in differ[:recent]
        ],
    }
