"""What a request leaves in Redis before it is forwarded, so it is billed if its sidecar dies.

A request's settlement is written when it finishes. If the sidecar dies first (kill -9, OOM,
node loss) nobody writes it, so before forwarding the sidecar stores an *orphan*: enough to
bill the request as estimated, its counted input at the routed model's rate, output unknown
(`outcome: orphaned`). Any replica's reaper bills it once the sidecar has stopped renewing
its hold or lease (governance.holds).

The orphan used to be the whole estimated `Settlement`, priced and serialized per request
(a tenth of the sidecar's CPU at load, ~300 bytes in Redis and its append-only file). This
is the compact form: the facts only, a short JSON array, priced by the reaper with its own
price table if it is ever needed, which for nearly every request it never is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo

from extproc.metering.bill import bill, stamp_versions
from extproc.metering.decisions import utf8_text
from extproc.metering.prices import PriceTable
from extproc.metering.settlement import Charged, settlement_for
from extproc.store.schema import workspace_prefix
from extproc.v1.ledger_pb2 import Settlement, UsageRecord
from extproc.wire.usage import Usage

_MARK = b"o1"
_COMPACT = json.JSONEncoder(separators=(",", ":"))
"""`json.dumps` with options builds an encoder per call; an orphan is encoded per request."""
"""Compact orphans start with this; anything else a reaper finds is a serialized Settlement
(holds made before compact orphans)."""


@dataclass(frozen=True, slots=True)
class Orphan:
    """One admitted request's billable facts, as known before it is forwarded."""

    request_id: str
    time_ms: int
    endpoint: str
    model_requested: str
    model_served: str  # what routing sends upstream: the model the estimate is priced for
    counted_input: int
    workspace: str
    service: str
    key_id: str
    team: str
    period: str  # the budget period its hold or lease counts in
    timezone: str  # the policy's: the day and hour the record counts in
    charged: tuple[Charged, ...]  # the scopes its reservation checked, with soft limits
    stream: bool = False
    output_cap: int = 0
    session_id: str = ""
    envoy_request_id: str = ""
    routing: str = ""  # the routing steps' header value, as the record carries it
    attributed: bool = True

    def encode(self) -> bytes:
        """The stored form: `o1` and a JSON array, ASCII (client-chosen text stays inside
        quotes, and a lone surrogate a client sent stays an escape until it is billed)."""
        charged = [[c.scope, -1 if c.soft_nanos is None else c.soft_nanos] for c in self.charged]
        fields = [
            self.request_id, self.time_ms, self.endpoint, self.model_requested,
            self.model_served, self.counted_input, self.workspace, self.service, self.key_id,
            self.team, self.period, self.timezone, charged, int(self.stream), self.output_cap,
            self.session_id, self.envoy_request_id, self.routing, int(self.attributed),
        ]  # fmt: skip
        return _MARK + _COMPACT.encode(fields).encode()

    @classmethod
    def decode(cls, data: bytes) -> Orphan:
        (rid, time_ms, endpoint, requested, served, counted, workspace, service, key_id, team,
         period, tz, charged, stream, cap, session, envoy_rid, routing, attributed,
         ) = json.loads(data[len(_MARK):])  # fmt: skip
        return cls(
            rid, time_ms, endpoint, requested, served, counted, workspace, service, key_id,
            team, period, tz,
            tuple(Charged(scope, None if soft < 0 else soft) for scope, soft in charged),
            bool(stream), cap, session, envoy_rid, routing, bool(attributed),
        )  # fmt: skip


def is_compact(data: bytes) -> bool:
    return data.startswith(_MARK)


def orphan_settlement(orphan: Orphan, prices: PriceTable) -> Settlement:
    """The estimated settlement of a request whose sidecar died: what the sidecar would have
    written had it settled the moment it forwarded (no reservation: the reaper released it)."""
    requested, served = utf8_text(orphan.model_requested), utf8_text(orphan.model_served)
    record = UsageRecord(
        request_id=orphan.request_id,
        time_ms=orphan.time_ms,
        endpoint=orphan.endpoint,
        model_requested=requested,
        model_served=served or requested,
        stream=orphan.stream,
        counted_input_tokens=orphan.counted_input,
        estimated=True,
        outcome="orphaned",
        session_id=utf8_text(orphan.session_id),
        envoy_request_id=orphan.envoy_request_id,
        output_cap=orphan.output_cap,
    )
    stamp_versions(record, prices)
    if orphan.counted_input:
        bill(record, prices, served or requested or "unknown", Usage(orphan.counted_input))
    if orphan.routing:
        record.routing = orphan.routing
    if orphan.attributed:
        record.workspace, record.service, record.key_id = (
            orphan.workspace, orphan.service, orphan.key_id,
        )  # fmt: skip
        record.team = orphan.team
    local = datetime.fromtimestamp(orphan.time_ms / 1000, ZoneInfo(orphan.timezone))
    return settlement_for(
        record,
        orphan.charged,
        prefix=workspace_prefix(orphan.workspace),  # as the request's plan derived it
        period_id=orphan.period,
        local_time=local,
        prices=prices,
        attributed=orphan.attributed,
    )
