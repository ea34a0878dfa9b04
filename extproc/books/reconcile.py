"""`extproc reconcile`: the ledger against what OpenAI says it served and billed.

The gateway's ledger is our claim; the provider's organization Usage API (tokens and
requests per project, key and model) and Costs API (dollars per project and line item) are
theirs. For one UTC day, per workspace (found at the provider by the policy's
`upstream.project_id`) and model, the two are compared, and every difference is explained
as what it most likely is:

- the provider served more tokens than the ledger saw: traffic reached OpenAI with the
  workspace's key without passing the gateway (a leaked key, a script calling OpenAI
  directly). Its cost is the provider's bill for those tokens.
- the same tokens, a different bill: our price table is stale, or misprices that model.
- the ledger saw more than the provider billed: requests the provider did not meter
  (failed upstream, estimated usage), worth a look but not money lost.

The comparison itself is a pure function of the three inputs (`reconcile`); fetching pages
from the API, alerting and the metric are at the edges.
"""

from __future__ import annotations

import contextlib
import json
import urllib.error
import urllib.parse
import urllib.request
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

from extproc.books.records import model_of
from extproc.metering.prices import NANOS_PER_DOLLAR, usd
from extproc.v1.ledger_pb2 import UsageRecord

DEFAULT_BASE_URL = "https://api.openai.com/v1"
USAGE_ENDPOINTS = ("usage/completions", "usage/embeddings")
LINE_KINDS = (
    "input", "cached input", "cache write", "input audio", "output", "output audio",
    "output image", "web search", "file search", "code interpreter", "image generation",
)  # fmt: skip
ADJUSTMENT = "adjustment"


class ProviderError(Exception):
    """The provider's admin API could not be read; the message says why, never the key."""


@dataclass
class Tokens:
    input: int = 0
    cached: int = 0
    output: int = 0
    requests: int = 0

    def add(self, other: Tokens) -> None:
        self.input += other.input
        self.cached += other.cached
        self.output += other.output
        self.requests += other.requests

    def to_dict(self) -> dict[str, int]:
        return {
            "input_tokens": self.input,
            "cached_input_tokens": self.cached,
            "output_tokens": self.output,
            "requests": self.requests,
        }


@dataclass
class ProviderDay:
    """What the provider reports for one day: tokens per (project, model), cost per
    (project, model) from the line items "<model>, input|cached input|output"."""

    tokens: dict[tuple[str, str], Tokens] = field(default_factory=dict)
    cost: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    # (project, model, line kind) -> nanos: what the true-up derives effective rates from.
    lines: dict[tuple[str, str, str], int] = field(default_factory=lambda: defaultdict(int))


@dataclass(frozen=True, slots=True)
class ModelLine:
    model: str
    provider: Tokens
    ledger: Tokens
    provider_nanos: int
    ledger_nanos: int
    finding: str | None

    @property
    def drift_nanos(self) -> int:
        return self.provider_nanos - self.ledger_nanos

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "provider": {**self.provider.to_dict(), "cost_usd": usd(self.provider_nanos)},
            "ledger": {**self.ledger.to_dict(), "cost_usd": usd(self.ledger_nanos)},
            "drift_usd": usd(self.drift_nanos),
            "finding": self.finding,
        }


@dataclass(frozen=True, slots=True)
class WorkspaceDay:
    workspace: str | None  # None: a project no workspace maps to
    project_id: str | None  # None: a workspace with no project_id in the policy
    day: date
    lines: tuple[ModelLine, ...]

    @property
    def provider_nanos(self) -> int:
        return sum(line.provider_nanos for line in self.lines)

    @property
    def ledger_nanos(self) -> int:
        return sum(line.ledger_nanos for line in self.lines)

    @property
    def drift_nanos(self) -> int:
        return self.provider_nanos - self.ledger_nanos

    @property
    def findings(self) -> list[str]:
        return [f"{line.model}: {line.finding}" for line in self.lines if line.finding]

    def to_dict(self) -> dict[str, Any]:
        return {
            "workspace": self.workspace,
            "project_id": self.project_id,
            "day": self.day.isoformat(),
            "provider_cost_usd": usd(self.provider_nanos),
            "ledger_cost_usd": usd(self.ledger_nanos),
            "drift_usd": usd(self.drift_nanos),
            "findings": self.findings,
            "models": [line.to_dict() for line in self.lines],
        }


@dataclass(frozen=True, slots=True)
class Reconciliation:
    day: date
    rows: tuple[WorkspaceDay, ...]

    @property
    def drift_nanos(self) -> int:
        return sum(row.drift_nanos for row in self.rows)

    @property
    def drifted(self) -> tuple[WorkspaceDay, ...]:
        return tuple(r for r in self.rows if r.drift_nanos or r.findings)

    def to_dict(self) -> dict[str, Any]:
        return {
            "day": self.day.isoformat(),
            "drift_usd": usd(self.drift_nanos),
            "in_agreement": not self.drifted,
            "workspaces": [row.to_dict() for row in self.rows],
        }


# -- the comparison (pure) --------------------------------------------------------------------


def trued_up(records: Iterable[UsageRecord]) -> set[tuple[str, str]]:
    """(workspace, model) pairs the true-up has already adjusted."""
    return {(r.workspace, model_of(r)) for r in records if r.outcome == ADJUSTMENT}


def ledger_tokens(records: Iterable[UsageRecord]) -> dict[tuple[str, str], tuple[Tokens, int]]:
    """(workspace, model) -> tokens and cost, for the records that reached the provider."""
    out: dict[tuple[str, str], tuple[Tokens, int]] = {}
    for r in records:
        if r.outcome == "rejected":  # answered by the sidecar: the provider never saw it
            continue
        key = (r.workspace, model_of(r))
        tokens, nanos = out.get(key, (Tokens(), 0))
        if r.outcome != ADJUSTMENT:  # a true-up moves money only: no tokens, no request
            tokens.add(Tokens(r.input_tokens, r.cached_input_tokens, r.output_tokens, 1))
        out[key] = (tokens, nanos + r.cost_nanos)
    return out


def _finding(provider: Tokens, ledger: Tokens, p_nanos: int, l_nanos: int) -> str | None:
    more = (
        provider.input > ledger.input
        or provider.output > ledger.output
        or provider.requests > ledger.requests
    )
    same = (provider.input, provider.cached, provider.output) == (
        ledger.input,
        ledger.cached,
        ledger.output,
    )
    if more:
        return (
            f"the provider served {provider.requests - ledger.requests} more requests "
            f"({provider.input - ledger.input} input, {provider.output - ledger.output} output "
            f"tokens) than passed the gateway: traffic bypassing it with the workspace's key"
        )
    if same and p_nanos != l_nanos:
        return (
            f"same tokens, billed ${usd(p_nanos)} by the provider and ${usd(l_nanos)} in the "
            f"ledger: the price table is stale or misprices this model"
        )
    if not same or p_nanos != l_nanos:
        return (
            "the ledger counted usage the provider did not bill (upstream failures, "
            "estimated records)"
        )
    return None


def reconcile(
    day: date,
    projects: dict[str, str | None],
    provider: ProviderDay,
    records: Iterable[UsageRecord],
) -> Reconciliation:
    """Compare one day. `projects` maps each workspace to its provider project (or None).

    A (workspace, model) whose money the true-up already brought to the bill is in
    agreement: its token difference was reported (and alerted) when it was adjusted."""
    records = list(records)
    ledger = ledger_tokens(records)
    adjusted = trued_up(records)
    by_project = {p: ws for ws, p in projects.items() if p}
    rows: list[WorkspaceDay] = []
    keys_by_ws: dict[str | None, set[str]] = defaultdict(set)
    for ws, model in ledger:
        if ws in projects:
            keys_by_ws[ws].add(model)
    for project, model in (*provider.tokens, *provider.cost):
        keys_by_ws[by_project.get(project)].add(model)
    unmapped = sorted({p for p, _m in (*provider.tokens, *provider.cost) if p not in by_project})
    for ws in sorted(projects):
        project = projects[ws]
        lines = []
        for model in sorted(keys_by_ws.get(ws, ())):
            l_tokens, l_nanos = ledger.get((ws, model), (Tokens(), 0))
            p_tokens = provider.tokens.get((project or "", model), Tokens())
            p_nanos = provider.cost.get((project or "", model), 0)
            if project is None:  # nothing to compare against: report the ledger side only
                lines.append(ModelLine(model, p_tokens, l_tokens, l_nanos, l_nanos, None))
                continue
            finding = _finding(p_tokens, l_tokens, p_nanos, l_nanos)
            if p_nanos == l_nanos and (ws, model) in adjusted:
                finding = None
            lines.append(ModelLine(model, p_tokens, l_tokens, p_nanos, l_nanos, finding))
        rows.append(WorkspaceDay(ws, project, day, tuple(lines)))
    for project in unmapped:
        lines = []
        models = {m for p, m in (*provider.tokens, *provider.cost) if p == project}
        for model in sorted(models):
            p_tokens = provider.tokens.get((project, model), Tokens())
            p_nanos = provider.cost.get((project, model), 0)
            finding = "a project no workspace names as its upstream.project_id"
            lines.append(ModelLine(model, p_tokens, Tokens(), p_nanos, 0, finding))
        rows.append(WorkspaceDay(None, project, day, tuple(lines)))
    return Reconciliation(day, tuple(rows))


# -- the provider's admin API ------------------------------------------------------------------


def to_nanos(value: Decimal) -> int:
    """Dollars as the API writes them, to the nearest nano-dollar (exact when it is one)."""
    return int((value * NANOS_PER_DOLLAR).to_integral_value(rounding=ROUND_HALF_EVEN))


def day_bounds(day: date) -> tuple[int, int]:
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    return int(start.timestamp()), int((start + timedelta(days=1)).timestamp())


class AdminClient:
    """Pages through OpenAI's organization Usage and Costs APIs with an admin key."""

    def __init__(self, admin_key: str, base_url: str = DEFAULT_BASE_URL, timeout: float = 30):
        self._key = admin_key
        self._base = base_url.rstrip("/")
        self._timeout = timeout

    def _get(self, path: str, params: list[tuple[str, str]]) -> dict[str, Any]:
        url = f"{self._base}/organization/{path}?{urllib.parse.urlencode(params)}"
        request = urllib.request.Request(
            url, headers={"authorization": f"Bearer {self._key}", "accept": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as resp:
                body = resp.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:500].decode("utf-8", "replace")
            with contextlib.suppress(ValueError, KeyError, TypeError):
                detail = json.loads(detail)["error"]["message"]
            raise ProviderError(f"{path}: HTTP {exc.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ProviderError(f"{self._base}: {reason}") from None
        try:
            page: dict[str, Any] = json.loads(body, parse_float=Decimal)
        except ValueError:
            raise ProviderError(f"{path}: the answer is not JSON") from None
        return page

    def buckets(self, path: str, params: list[tuple[str, str]]) -> Iterator[dict[str, Any]]:
        page: str | None = None
        while True:
            answer = self._get(path, params + ([("page", page)] if page else []))
            yield from answer.get("data", [])
            page = answer.get("next_page")
            if not answer.get("has_more") or not page:
                return

    def day(self, day: date, project_ids: Iterable[str] = ()) -> ProviderDay:
        """Tokens and costs of one UTC day, per project and model."""
        start, end = day_bounds(day)
        window = [("start_time", str(start)), ("end_time", str(end)), ("bucket_width", "1d")]
        window += [("project_ids", p) for p in project_ids]
        out = ProviderDay()
        for path in USAGE_ENDPOINTS:
            groups = [("group_by", "project_id"), ("group_by", "model")]
            for bucket in self.buckets(path, window + groups):
                for row in bucket.get("results", []):
                    key = (row.get("project_id") or "", row.get("model") or "")
                    tokens = out.tokens.setdefault(key, Tokens())
                    tokens.add(
                        Tokens(
                            int(row.get("input_tokens") or 0),
                            int(row.get("input_cached_tokens") or 0),
                            int(row.get("output_tokens") or 0),
                            int(row.get("num_model_requests") or 0),
                        )
                    )
        groups = [("group_by", "project_id"), ("group_by", "line_item")]
        for bucket in self.buckets("costs", window + groups):
            for row in bucket.get("results", []):
                amount = (row.get("amount") or {}).get("value") or Decimal(0)
                model, kind = line_item_parts(row.get("line_item") or "")
                nanos = to_nanos(Decimal(amount))
                out.cost[(row.get("project_id") or "", model)] += nanos
                out.lines[(row.get("project_id") or "", model, kind)] += nanos
        return out


def line_item_parts(line_item: str) -> tuple[str, str]:
    """ "gpt-4o-mini-2024-07-18, cached input" -> ("gpt-4o-mini-2024-07-18", "cached input")."""
    model, sep, kind = line_item.rpartition(", ")
    return (model, kind) if sep and kind in LINE_KINDS else (line_item, "")


def line_item_model(line_item: str) -> str:
    return line_item_parts(line_item)[0]
