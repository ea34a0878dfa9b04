"""How a finished request is reported to telemetry, as a plain function."""

from __future__ import annotations

import pytest

from extproc.insight.telemetry import verdict
from extproc.v1.ledger_pb2 import UsageRecord


@pytest.mark.parametrize(
    ("rejected", "reason", "downgraded", "estimated", "expected"),
    [
        (True, None, False, False, ("denied", "bad_request")),
        (True, "budget", False, False, ("denied", "budget")),
        (True, "rate", True, False, ("denied", "rate")),
        (False, None, True, True, ("downgraded", None)),
        (False, None, False, True, ("estimated", None)),
        (False, None, False, False, ("allowed", None)),
    ],
)
def test_verdict(
    rejected: bool,
    reason: str | None,
    downgraded: bool,
    estimated: bool,
    expected: tuple[str, str | None],
) -> None:
    record = UsageRecord(estimated=estimated)
    got = verdict(record, rejected=rejected, denial_reason=reason, downgraded=downgraded)
    assert got == expected
