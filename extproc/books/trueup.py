"""True-up: the provider's bill for a day, written back into the ledger.

`reconcile` says where the books drift; this module makes them agree. From the Costs API's
line items ("<model>, input" / "cached input" / "output" ...) and the Usage API's tokens it
derives the rates the provider actually charged per model and kind, and:

- plans one adjustment record per (workspace, model) whose bill differs from the ledger by
  more than rounding (each ledger record rounds up to a whole nano-dollar, each line item
  to the nearest one): cost = provider minus ledger, outcome "adjustment", flagged
  (`price_source: true-up`), dated the last millisecond of the day. Through the ledger's
  own settle script they move `spend`, the budgets and FOCUS exports to the invoice. The
  ledger side counts earlier adjustments, so running the true-up twice adds nothing, and
  each adjustment's id is derived from the day, workspace, model and sequence.
- writes the price-file rows that would have priced the day right: for each model whose
  effective rates differ from the table's, its rates as the provider charged them.

Pure functions of the reconciliation and the provider's day; writing is the CLI's edge.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from fractions import Fraction

from extproc.books.reconcile import ProviderDay, Reconciliation
from extproc.metering.prices import NANOS_PER_DOLLAR, PriceTable, usd
from extproc.metering.rates import MILLION, per_million_usd
from extproc.v1.ledger_pb2 import UsageRecord

ADJUSTMENT = "adjustment"
TRUE_UP = "true-up"
# Line items and the ledger's parts, by the kind each bills (Usage API column in the middle).
KINDS = {
    "input": "input",
    "cached input": "cached_input",
    "output": "output",
}


@dataclass(frozen=True, slots=True)
class EffectiveRate:
    model: str
    kind: str  # "input", "cached_input", "output"
    tokens: int
    nanos: int  # what the provider billed for them

    @property
    def nanos_per_million(self) -> Fraction:
        return Fraction(self.nanos * MILLION, self.tokens)

    @property
    def usd_per_million(self) -> Decimal:
        """Rounded to the nano-dollar per 1M tokens (the price file's precision)."""
        return per_million_usd(round(self.nanos_per_million))


def effective_rates(provider: ProviderDay) -> list[EffectiveRate]:
    """Per model and kind, over every project: billed nanos / billed tokens."""
    tokens: dict[tuple[str, str], int] = {}
    for (_project, model), t in provider.tokens.items():
        for kind, count in (("input", t.input - t.cached), ("cached_input", t.cached),
                            ("output", t.output)):  # fmt: skip
            tokens[(model, kind)] = tokens.get((model, kind), 0) + count
    billed: dict[tuple[str, str], int] = {}
    for (_project, model, item), nanos in provider.lines.items():
        kind = KINDS.get(item)
        if kind is not None:
            billed[(model, kind)] = billed.get((model, kind), 0) + nanos
    return [
        EffectiveRate(model, kind, tokens[(model, kind)], nanos)
        for (model, kind), nanos in sorted(billed.items())
        if tokens.get((model, kind))
    ]


def mispriced(rates: Iterable[EffectiveRate], table: PriceTable) -> dict[str, list[EffectiveRate]]:
    """Models whose effective rate differs from the table's by more than rounding."""
    out: dict[str, list[EffectiveRate]] = {}
    for rate in rates:
        ours = getattr(table.price_for(rate.model)[0].cards["default"].base, rate.kind)
        # Line items round to the nano-dollar: a rate within one nano of the bill is ours.
        if abs(Fraction(ours * rate.tokens, MILLION) - rate.nanos) > 1:
            out.setdefault(rate.model, []).append(rate)
    return out


def override_rows(day: date, wrong: dict[str, list[EffectiveRate]]) -> str:
    """The price-file rows that would have priced `day` as the provider did."""
    blocks = []
    for model, rates in sorted(wrong.items()):
        lines = [f'[models."{model.lower()}"]']
        for rate in rates:
            exact = rate.nanos_per_million.denominator == 1
            lines.append(
                f'{rate.kind} = "{rate.usd_per_million}"' + ("" if exact else "  # rounded")
            )
        lines += [
            'source = "https://platform.openai.com/settings/organization/usage"',
            f"as_of = {day.isoformat()}",
            f"note = \"effective rates of the provider's bill of {day.isoformat()} "
            '(extproc reconcile)"',
        ]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _slug(model: str) -> str:
    return "".join(c if c.isalnum() or c in "-._" else "_" for c in model)[:64]


def adjustments(
    rec: Reconciliation, version: str, counts: dict[tuple[str, str], int]
) -> list[UsageRecord]:
    """One record per (workspace, model) drifting beyond rounding; `counts` holds the
    ledger's records (adjustments excluded) and adjustments already written per key."""
    end = datetime(rec.day.year, rec.day.month, rec.day.day, tzinfo=UTC) + timedelta(days=1)
    at_ms = int(end.timestamp() * 1000) - 1
    out = []
    for row in rec.rows:
        if row.workspace is None or row.project_id is None:
            continue
        for line in row.lines:
            drift = line.drift_nanos
            # Each ledger record rounds up by under a nano-dollar; each line item by half.
            if abs(drift) <= line.ledger.requests + 3:
                continue
            done = counts.get((row.workspace, line.model), 0)
            out.append(
                UsageRecord(
                    request_id=f"{TRUE_UP}:{rec.day.isoformat()}:{row.workspace}:"
                    f"{_slug(line.model)}:{done + 1}",
                    time_ms=at_ms,
                    endpoint="reconcile",
                    model_requested=line.model,
                    model_served=line.model,
                    status=200,
                    cost_nanos=drift,
                    outcome=ADJUSTMENT,
                    estimated=True,
                    price_family=TRUE_UP,
                    price_source=TRUE_UP,
                    price_version=version,
                    workspace=row.workspace,
                    adjustment=(
                        f"{TRUE_UP} {rec.day.isoformat()} {line.model}: provider "
                        f"${usd(line.provider_nanos)}, ledger ${usd(line.ledger_nanos)}"
                        + (f" ({line.finding})" if line.finding else "")
                    ),
                )
            )
    return out


def adjustment_counts(records: Iterable[UsageRecord]) -> dict[tuple[str, str], int]:
    counts: dict[tuple[str, str], int] = {}
    for r in records:
        if r.outcome == ADJUSTMENT:
            key = (r.workspace, r.model_served)
            counts[key] = counts.get(key, 0) + 1
    return counts


__all__ = [
    "ADJUSTMENT",
    "NANOS_PER_DOLLAR",
    "EffectiveRate",
    "adjustment_counts",
    "adjustments",
    "effective_rates",
    "mispriced",
    "override_rows",
]
