"""OpenAI's organization Usage and Costs APIs, answered from what this simulator served.

`extproc reconcile` compares the gateway's ledger with these two APIs, so the simulator
keeps a book of every generation it served, per upstream key, and answers
`GET /v1/organization/usage/completions`, `/usage/embeddings` and `/costs` the way
OpenAI documents them: an admin key in `Authorization`, `start_time` (required, Unix
seconds, inclusive), `end_time` (exclusive), `bucket_width` (`1m`, `1h`, `1d`; costs: `1d`
only), `group_by`, `project_ids` / `api_key_ids` / `models` filters, `limit` (buckets per
page, with OpenAI's defaults and maxima) and an opaque `page` cursor answered by
`has_more` / `next_page`. Buckets are aligned to the width in UTC; empty buckets are
returned with no results.

A key's project and key id are derived from the key itself (`simulated_ids`), as stable
stand-ins for the ids OpenAI assigns. Costs are priced with the bundled price table (or
`EXTPROC_SIM_PRICES`, a price file of its own, to play a provider whose prices moved), per
line item "<model>, input" / "<model>, cached input" / "<model>, output" (and the other
parts the ledger bills), each the exact sum of its calls rounded once to the nano-dollar
and rendered as the shortest decimal (no float arithmetic on the way).
"""

from __future__ import annotations

import base64
import hashlib
import os
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Any
from urllib.parse import parse_qs

from extproc.metering.prices import PriceTable
from extproc.metering.rates import MILLION
from extproc.wire.usage import Usage

ADMIN_PREFIX = "sk-admin-"
USAGE_PATHS = {
    "/v1/organization/usage/completions": "completions",
    "/v1/organization/usage/embeddings": "embeddings",
}
COSTS_PATH = "/v1/organization/costs"
WIDTHS = {"1m": 60, "1h": 3600, "1d": 86400}
LIMITS = {"1m": (60, 1440), "1h": (24, 168), "1d": (7, 31)}  # (default, max) buckets
COST_LIMITS = (7, 180)
USAGE_GROUPS = {
    "completions": ("project_id", "user_id", "api_key_id", "model", "batch", "service_tier"),
    "embeddings": ("project_id", "user_id", "api_key_id", "model"),
}
COST_GROUPS = ("project_id", "line_item")


def simulated_ids(api_key: str) -> tuple[str, str]:
    """(project_id, api_key_id) the simulator reports for an upstream key."""
    digest = hashlib.sha256(api_key.encode()).hexdigest()
    return f"proj_{digest[:24]}", f"key_{digest[24:40]}"


@dataclass(frozen=True, slots=True)
class Served:
    """One generation the simulator served: what OpenAI would meter and bill."""

    at: int  # Unix seconds
    kind: str  # "completions" | "embeddings"
    project_id: str
    api_key_id: str
    model: str
    input_tokens: int
    cached_tokens: int
    output_tokens: int


class AdminError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


class UsageBook:
    """Every generation served, and the two admin APIs computed from it."""

    def __init__(self, prices: PriceTable | None = None) -> None:
        path = os.environ.get("EXTPROC_SIM_PRICES")
        self.prices = prices or PriceTable.load(path or None)
        self._served: list[Served] = []
        self._lock = threading.Lock()

    def record(
        self, kind: str, authorization: str, model: str, inp: int, cached: int, out: int
    ) -> None:
        key = authorization.removeprefix("Bearer ").strip()
        project, key_id = simulated_ids(key)
        served = Served(int(time.time()), kind, project, key_id, model, inp, cached, out)
        with self._lock:
            self._served.append(served)

    def snapshot(self) -> list[Served]:
        with self._lock:
            return list(self._served)

    # -- the API ---------------------------------------------------------------------------

    def answer(self, path: str, query: str, authorization: str) -> dict[str, Any]:
        key = authorization.removeprefix("Bearer ").strip()
        if not authorization.startswith("Bearer ") or not key:
            raise AdminError(401, "You didn't provide an API key.")
        if not key.startswith(ADMIN_PREFIX):
            raise AdminError(
                403, "This endpoint requires an admin API key (sk-admin-...) of the organization."
            )
        params = _params(query)
        if path == COSTS_PATH:
            return self._costs(params)
        return self._usage(USAGE_PATHS[path], params)

    def _usage(self, kind: str, params: dict[str, list[str]]) -> dict[str, Any]:
        width = _one(params, "bucket_width", "1d")
        if width not in WIDTHS:
            raise AdminError(
                400, f"Invalid bucket_width {width!r}: use 1m, 1h or 1d.", "bucket_width"
            )
        groups = _choices(params, "group_by", USAGE_GROUPS[kind])
        served = [
            s
            for s in self.snapshot()
            if s.kind == kind
            and _wanted(params, "project_ids", s.project_id)
            and _wanted(params, "api_key_ids", s.api_key_id)
            and _wanted(params, "models", s.model)
        ]

        def results(bucket: list[Served]) -> list[dict[str, Any]]:
            sums: dict[tuple[Any, ...], list[int]] = defaultdict(lambda: [0, 0, 0, 0])
            for s in bucket:
                acc = sums[_group_key(s, groups)]
                acc[0] += s.input_tokens
                acc[1] += s.cached_tokens
                acc[2] += s.output_tokens
                acc[3] += 1
            out = []
            for key, (inp, cached, outp, n) in sorted(sums.items(), key=lambda kv: str(kv[0])):
                row: dict[str, Any] = {"object": f"organization.usage.{kind}.result"}
                row["input_tokens"] = inp
                if kind == "completions":
                    row |= {
                        "output_tokens": outp,
                        "input_cached_tokens": cached,
                        "input_audio_tokens": 0,
                        "output_audio_tokens": 0,
                    }
                row["num_model_requests"] = n
                row |= _group_fields(key, groups, USAGE_GROUPS[kind])
                out.append(row)
            return out

        return _page(params, width, LIMITS[width], served, results)

    def _costs(self, params: dict[str, list[str]]) -> dict[str, Any]:
        width = _one(params, "bucket_width", "1d")
        if width != "1d":
            raise AdminError(
                400, "Invalid bucket_width: the costs API supports 1d only.", "bucket_width"
            )
        groups = _choices(params, "group_by", COST_GROUPS)
        served = [s for s in self.snapshot() if _wanted(params, "project_ids", s.project_id)]

        def results(bucket: list[Served]) -> list[dict[str, Any]]:
            sums: dict[tuple[Any, ...], int] = defaultdict(int)
            for s in bucket:
                for line_item, femtos in self._line_items(s):
                    key = tuple(s.project_id if g == "project_id" else line_item for g in groups)
                    sums[key] += femtos
            out = []
            for key, femtos in sorted(sums.items(), key=lambda kv: str(kv[0])):
                # A line item is its exact sum, rounded once to the nano-dollar (half even).
                nanos = round(Fraction(femtos, MILLION))
                row: dict[str, Any] = {
                    "object": "organization.costs.result",
                    "amount": {"value": _number(nanos), "currency": "usd"},
                }
                row |= _group_fields(key, groups, COST_GROUPS)
                out.append(row)
            return out

        return _page(params, width, COST_LIMITS, served, results)

    def _line_items(self, s: Served) -> list[tuple[str, int]]:
        """ "<model>, <kind>" and each part's exact amount in 1e-15 USD (kinds as the ledger's
        parts, "cached_input" written "cached input")."""
        charge = self.prices.charge(
            s.model, Usage(s.input_tokens, s.cached_tokens, s.output_tokens)
        )
        return [(f"{s.model}, {p.kind.replace('_', ' ')}", p.femtos) for p in charge.parts]


def _number(nanos: int) -> float:
    """Dollars as a float whose shortest repr is exactly the nano-dollar decimal."""
    # Python writes a float as its shortest round-trip repr, which is this very decimal for
    # every amount with up to 15 significant digits (below a million dollars a bucket).
    return float(f"{Decimal(nanos).scaleb(-9).normalize():f}")


def _params(query: str) -> dict[str, list[str]]:
    raw = parse_qs(query, keep_blank_values=False)
    out: dict[str, list[str]] = defaultdict(list)
    for name, values in raw.items():
        out[name.removesuffix("[]")].extend(values)
    return dict(out)


def _one(params: dict[str, list[str]], name: str, default: str | None = None) -> str | None:
    values = params.get(name)
    return values[-1] if values else default


def _int(params: dict[str, list[str]], name: str) -> int | None:
    value = _one(params, name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise AdminError(
            400, f"Invalid {name}: expected an integer, got {value!r}.", name
        ) from None


def _choices(params: dict[str, list[str]], name: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
    chosen: list[str] = []
    for value in params.get(name, []):
        for part in value.split(","):
            if part not in allowed:
                raise AdminError(
                    400, f"Invalid {name} value {part!r}: use {', '.join(allowed)}.", name
                )
            if part not in chosen:
                chosen.append(part)
    return tuple(chosen)


def _wanted(params: dict[str, list[str]], name: str, value: str) -> bool:
    wanted = [p for v in params.get(name, []) for p in v.split(",")]
    return not wanted or value in wanted


def _group_key(s: Served, groups: tuple[str, ...]) -> tuple[Any, ...]:
    values = {
        "project_id": s.project_id,
        "user_id": None,
        "api_key_id": s.api_key_id,
        "model": s.model,
        "batch": False,
        "service_tier": "default",
    }
    return tuple(values[g] for g in groups)


def _group_fields(
    key: tuple[Any, ...], groups: tuple[str, ...], every: tuple[str, ...]
) -> dict[str, Any]:
    fields: dict[str, Any] = dict.fromkeys(every)
    fields.update(zip(groups, key, strict=True))
    return fields


def _cursor(start: int) -> str:
    return base64.urlsafe_b64encode(f"b{start}".encode()).decode()


def _uncursor(page: str) -> int:
    try:
        text = base64.urlsafe_b64decode(page.encode()).decode()
        if not text.startswith("b"):
            raise ValueError(text)
        return int(text[1:])
    except ValueError:
        raise AdminError(400, "Invalid page cursor.", "page") from None


def _page(
    params: dict[str, list[str]],
    width: str,
    limits: tuple[int, int],
    served: list[Served],
    results: Any,
) -> dict[str, Any]:
    start = _int(params, "start_time")
    if start is None:
        raise AdminError(400, "Missing required parameter: 'start_time'.", "start_time")
    end = _int(params, "end_time")
    if end is None:
        end = int(time.time()) + 1
    if end <= start:
        raise AdminError(400, "end_time must be after start_time.", "end_time")
    limit = _int(params, "limit")
    default, most = limits
    if limit is None:
        limit = default
    if not 1 <= limit <= most:
        raise AdminError(400, f"Invalid limit: must be between 1 and {most}.", "limit")
    step = WIDTHS[width]
    first = start - start % step
    page = _one(params, "page")
    cursor = _uncursor(page) if page else first
    data = []
    bucket_start = cursor
    while bucket_start < end and len(data) < limit:
        lo, hi = max(bucket_start, start), min(bucket_start + step, end)
        bucket = [s for s in served if lo <= s.at < hi]
        data.append(
            {
                "object": "bucket",
                "start_time": bucket_start,
                "end_time": bucket_start + step,
                "results": results(bucket),
            }
        )
        bucket_start += step
    more = bucket_start < end
    return {
        "object": "page",
        "data": data,
        "has_more": more,
        "next_page": _cursor(bucket_start) if more else None,
    }
