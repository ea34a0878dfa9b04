"""Redis bytes per request: what the ledger and its bookkeeping keep, by structure.

Measured with `MEMORY USAGE` on every key (all samples), grouped by what the key is for,
and divided by the number of ledger records: the figures the README's sizing table is
built from. `make bench` reports it after its enforced run; `python bench/bench_redis.py`
runs it alone against a fresh enforced stack.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _structures() -> tuple[tuple[str, re.Pattern[str]], ...]:
    """Key name (after the workspace's "{ws:NAME}:" prefix) -> structure, first match wins."""
    from extproc.store import schema as k

    def suffix(*names: str) -> re.Pattern[str]:
        alternatives = "|".join(map(re.escape, names))
        return re.compile(r"\}:(" + alternatives + r")(:|$)")

    return (
        ("ledger stream", suffix(k.LEDGER)),
        ("idempotency (seen sets)", suffix(k.SEEN)),
        ("spend aggregates (spent/day/hour)", suffix(k.SPENT, k.DAY, k.HOUR)),
        ("holds (reservations)", suffix(k.RESERVATIONS, k.RESERVATION_DATA, k.ORPHANS, k.HELD)),
        ("rate-limit windows", suffix(k.RATE_MINUTE)),
        ("prompt-cache fingerprints", suffix(k.PREFIX)),
        ("sessions", suffix(k.SESSION)),
    )


def structure_of(key: str) -> str:
    for name, pattern in _structures():
        if pattern.search(key):
            return name
    return "other (keys, registry, alerts)"


def redis_footprint(redis_url: str) -> dict[str, Any]:
    """Bytes per structure, ledger records, and bytes per request of what grows with them."""
    import redis

    r = redis.Redis.from_url(redis_url)
    try:
        sizes: Counter[str] = Counter()
        records = seen_members = 0
        for raw in r.scan_iter(count=1000):
            key = raw.decode()
            sizes[structure_of(key)] += int(r.memory_usage(key, samples=0) or 0)
            kind = structure_of(key)
            if kind == "ledger stream":
                records += int(r.xlen(key))
            elif kind == "idempotency (seen sets)":
                seen_members += int(r.scard(key))
    finally:
        r.close()
    per_request = {
        name: round(sizes[name] / records, 1)
        for name in ("ledger stream", "idempotency (seen sets)")
        if records
    }
    return {
        "records": records,
        "seen_members": seen_members,
        "bytes": dict(sizes),
        "bytes_per_request": per_request,
        "bytes_per_request_total": round(sum(per_request.values()), 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args(argv)

    from bench.bench import BENCH_POLICY, HOST, LOADS, PATH, bench_stack
    from bench.loadgen import build_request, run_closed_loop

    with bench_stack(BENCH_POLICY) as (stack, key):
        port = stack.config.listen_port
        body, headers = LOADS["json"]
        request = build_request(HOST, port, PATH, body, key, headers)
        asyncio.run(run_closed_loop(HOST, port, request, args.requests, 8))
        report = redis_footprint(stack.redis_url)
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
