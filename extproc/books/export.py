"""Usage records as files finance can load: JSON Lines, CSV, and FOCUS.

FOCUS (the FinOps Foundation's open cost and usage specification) is what cloud bills are
normalised to, so an AI gateway's spend written in it lands beside cloud spend in the same
FinOps tools. One row per request: a request is the unit we price, and summing rows is
exact. Every money column is a decimal string of the exact nano-dollar amount; nothing
passes through a float, so the sum of `BilledCost` is the ledger's total to the nano-dollar.

We know list prices only (no negotiated discounts, no commitments), so BilledCost,
EffectiveCost, ListCost and ContractedCost are the same amount. Columns the specification
reserves for providers' own extensions carry the `x_` prefix.

Both CSV formats are opened in spreadsheets, and many cells hold text a client chose (model
names, session ids, the `user` field): a cell a spreadsheet would evaluate as a formula
(`=HYPERLINK(...)`, `=cmd|...`) is written with a leading apostrophe, which every spreadsheet
reads as "this is text" (see `cell`). Numbers are never touched, a negative one included, so
money columns still sum.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import IO, Any

from extproc.books.records import model_of
from extproc.metering.ledger import record_to_dict
from extproc.metering.prices import usd
from extproc.v1.ledger_pb2 import UsageRecord
from extproc.wire.spec import display_name

FORMATS = ("jsonl", "csv", "focus")
FOCUS_VERSION = "1.2"
PROVIDER = "OpenAI"

FOCUS_COLUMNS = (
    "BilledCost",
    "EffectiveCost",
    "ListCost",
    "ContractedCost",
    "BillingCurrency",
    "BillingAccountId",
    "BillingAccountName",
    "BillingPeriodStart",
    "BillingPeriodEnd",
    "ChargePeriodStart",
    "ChargePeriodEnd",
    "ChargeCategory",
    "ChargeClass",
    "ChargeDescription",
    "ChargeFrequency",
    "ConsumedQuantity",
    "ConsumedUnit",
    "PricingQuantity",
    "PricingUnit",
    "ProviderName",
    "PublisherName",
    "InvoiceIssuerName",
    "ServiceCategory",
    "ServiceName",
    "ResourceId",
    "ResourceName",
    "ResourceType",
    "SkuId",
    "SkuPriceId",
    "SubAccountId",
    "SubAccountName",
    "Tags",
    "x_RequestId",
    "x_Endpoint",
    "x_InputTokens",
    "x_CachedInputTokens",
    "x_OutputTokens",
    "x_ReasoningTokens",
    "x_Outcome",
    "x_Estimated",
    "x_PriceFallback",
)


# What makes Excel, LibreOffice and Google Sheets evaluate a cell (OWASP's list): a formula
# sign, or a tab or carriage return that some of them skip before looking for one.
FORMULA_LEADS = ("=", "+", "-", "@", "\t", "\r")
_PLAIN_NUMBER = re.compile(r"-?[0-9]+(?:\.[0-9]+)?\Z")


def cell(value: Any) -> Any:
    """`value` as a CSV cell no spreadsheet evaluates.

    Text that starts like a formula gets a leading `'`; a plain decimal number (`-0.25`, an
    adjustment) stays as it is, because a spreadsheet reads it as a number, never a formula,
    and finance must be able to sum it. Integers are numbers already.
    """
    if not isinstance(value, str) or not value.startswith(FORMULA_LEADS):
        return value
    if _PLAIN_NUMBER.match(value):
        return value
    return "'" + value


def _cells(row: dict[str, Any]) -> dict[str, Any]:
    return {name: cell(value) for name, value in row.items()}


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _month(moment: datetime) -> tuple[datetime, datetime]:
    start = moment.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = (start + timedelta(days=32)).replace(day=1)
    return start, end


def tags(r: UsageRecord) -> dict[str, str]:
    """Who caused the charge: the attribution FinOps tools allocate by (empty ones left out)."""
    found = {
        "workspace": r.workspace,
        "team": r.team,
        "service": r.service,
        "key_id": r.key_id,
        "model": model_of(r),
        "session_id": r.session_id,
    }
    return {k: v for k, v in found.items() if v}


def focus_row(r: UsageRecord) -> dict[str, Any]:
    """One FOCUS row for one request."""
    start = datetime.fromtimestamp(r.time_ms / 1000, UTC)
    # ChargePeriodEnd is exclusive and must come after the start, even for a 0 ms refusal.
    end = start + timedelta(milliseconds=max(r.duration_ms, 1))
    period_start, period_end = _month(start)
    cost = usd(r.cost_nanos)
    model = model_of(r)
    tokens = r.input_tokens + r.output_tokens
    workspace = r.workspace or "_"
    description = (
        f"{model or 'unknown model'} via {r.endpoint or 'unknown endpoint'}: "
        f"{r.input_tokens} input tokens ({r.cached_input_tokens} cached), "
        f"{r.output_tokens} output tokens ({r.reasoning_tokens} reasoning)"
    )
    return {
        "BilledCost": cost,
        "EffectiveCost": cost,
        "ListCost": cost,
        "ContractedCost": cost,
        "BillingCurrency": "USD",
        "BillingAccountId": workspace,
        "BillingAccountName": workspace,
        "BillingPeriodStart": _iso(period_start),
        "BillingPeriodEnd": _iso(period_end),
        "ChargePeriodStart": _iso(start),
        "ChargePeriodEnd": _iso(end),
        "ChargeCategory": "Usage",
        "ChargeClass": "",
        "ChargeDescription": description,
        "ChargeFrequency": "Usage-Based",
        "ConsumedQuantity": str(tokens),
        "ConsumedUnit": "Tokens",
        "PricingQuantity": str(tokens),
        "PricingUnit": "Tokens",
        "ProviderName": PROVIDER,
        "PublisherName": PROVIDER,
        "InvoiceIssuerName": PROVIDER,
        "ServiceCategory": "AI and Machine Learning",
        "ServiceName": display_name(r.endpoint),
        "ResourceId": r.key_id or workspace,
        "ResourceName": r.service or r.key_id or workspace,
        "ResourceType": "API key" if r.key_id else "Workspace",
        "SkuId": r.price_family,
        "SkuPriceId": f"{r.price_family}@{r.price_version}" if r.price_version else r.price_family,
        "SubAccountId": r.team or r.service,
        "SubAccountName": r.team or r.service,
        "Tags": json.dumps(tags(r), sort_keys=True, separators=(",", ":")),
        "x_RequestId": r.request_id,
        "x_Endpoint": r.endpoint,
        "x_InputTokens": str(r.input_tokens),
        "x_CachedInputTokens": str(r.cached_input_tokens),
        "x_OutputTokens": str(r.output_tokens),
        "x_ReasoningTokens": str(r.reasoning_tokens),
        "x_Outcome": r.outcome,
        "x_Estimated": "true" if r.estimated else "false",
        "x_PriceFallback": "true" if r.price_fallback else "false",
    }


def record_columns() -> tuple[str, ...]:
    return (*(f.name for f in UsageRecord.DESCRIPTOR.fields), "cost_usd")


def write(records: Iterable[UsageRecord], fmt: str, out: IO[str]) -> int:
    """Write `records` to `out` in `fmt`; returns the number of rows.

    CSV rows end in CRLF (RFC 4180): Python's writer quotes a cell holding any character of
    the line terminator, so a carriage return a client put in its session id is quoted too;
    with a bare LF terminator it was not, and a reader split the row there.
    """
    count = 0
    if fmt == "jsonl":
        for r in records:
            out.write(json.dumps(record_to_dict(r), separators=(",", ":")) + "\n")
            count += 1
        return count
    if fmt == "csv":
        writer = csv.DictWriter(out, fieldnames=record_columns(), lineterminator="\r\n")
        writer.writeheader()
        for r in records:
            writer.writerow(_cells(record_to_dict(r)))
            count += 1
        return count
    if fmt == "focus":
        writer = csv.DictWriter(out, fieldnames=FOCUS_COLUMNS, lineterminator="\r\n")
        writer.writeheader()
        for r in records:
            writer.writerow(_cells(focus_row(r)))
            count += 1
        return count
    raise ValueError(f"unknown format {fmt!r} (expected one of {', '.join(FORMATS)})")
