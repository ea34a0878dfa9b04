"""Compact orphans bill exactly what the whole estimated settlement used to.

Before compact orphans, every hold carried the settlement to write if its sidecar died:
the exchange as seen so far (status 0, no answer) settled by `decisions.settle`, marked
`orphaned`. The compact orphan stores the facts only and is priced by the reaper; the
settlement it becomes must be the same, field for field.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from extproc.metering.decisions import Observed, settle
from extproc.metering.orphans import Orphan, is_compact, orphan_settlement
from extproc.metering.prices import PriceTable
from extproc.metering.settlement import Charged, settlement_for
from extproc.wire import spec as specs
from extproc.wire.endpoints import ENDPOINTS

PRICES = PriceTable.load()
BERLIN = ZoneInfo("Europe/Berlin")
T = int(datetime(2026, 11, 30, 23, 30, tzinfo=BERLIN).timestamp() * 1000)
CHARGED = (Charged("ws", 5_000_000), Charged("team:web", None), Charged("svc:cli", 900))


def old_orphan(seen: Observed, routed: str, routing: str) -> bytes:
    """The settlement the hold used to carry (the data plane's `_orphan` before)."""
    ghost = replace(seen, status=0, response_finished=False, stream=None, usage=None)
    ghost.routed_model = routed
    record = settle(ghost, PRICES, lambda text, model: 0)
    record.outcome = "orphaned"
    if routing:
        record.routing = routing
    record.workspace, record.service, record.key_id, record.team = "dev", "cli", "key_a", "web"
    return settlement_for(
        record, CHARGED, prefix="{ws:dev}", period_id="2026-11",
        local_time=datetime.fromtimestamp(T / 1000, BERLIN),
        prices=PRICES, reservation_id="", attributed=True,
    ).SerializeToString()  # fmt: skip


@pytest.mark.parametrize(
    ("body", "routed", "routing", "session"),
    [
        ({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
         "gpt-4o-mini", "", ""),
        ({"model": "codex-default", "messages": [{"role": "user", "content": "x" * 900}],
          "stream": True, "max_tokens": 64},
         "gpt-5-mini", "alias:codex-default>gpt-5-mini", "conv-7"),
        ({"model": "gpt-4o-mini", "input": "a", "max_output_tokens": 5}, "gpt-4o-mini", "", "s"),
        ({"model": "no-such-model\ud800|x", "messages": []}, "no-such-model\ud800|x", "", ""),
    ],
)  # fmt: skip
def test_a_compact_orphan_bills_what_the_whole_settlement_did(
    body: dict[str, object], routed: str, routing: str, session: str
) -> None:
    spec = specs.RESPONSES if "input" in body else specs.CHAT
    facts = ENDPOINTS[spec.path].facts(body)
    seen = Observed(
        request_id="req-1", envoy_request_id="env-1", time_ms=T, spec=spec,
        session_id=session, facts=facts, counted_input_tokens=1234,
    )  # fmt: skip
    orphan = Orphan(
        request_id="req-1", time_ms=T, endpoint=spec.name, model_requested=facts.model,
        model_served=routed, counted_input=1234, workspace="dev", service="cli",
        key_id="key_a", team="web", period="2026-11", timezone="Europe/Berlin",
        charged=CHARGED, stream=facts.stream, output_cap=facts.output_cap or 0,
        session_id=session, envoy_request_id="env-1", routing=routing,
    )  # fmt: skip
    blob = orphan.encode()
    assert is_compact(blob) and blob.isascii()
    assert len(blob) < 400  # what a request writes before it is forwarded
    assert Orphan.decode(blob) == orphan
    assert orphan_settlement(Orphan.decode(blob), PRICES).SerializeToString() == old_orphan(
        seen, routed, routing
    )


def test_a_serialized_settlement_is_not_taken_for_a_compact_orphan() -> None:
    seen = Observed(request_id="r", time_ms=T, spec=specs.CHAT)
    assert not is_compact(old_orphan(seen, "gpt-4o-mini", ""))
