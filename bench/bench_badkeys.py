"""A flood of bad keys must cost little: valid traffic's latency with and without one.

One enforced stack (policy, a real virtual key). Each round measures valid requests at c=1
alone, then the same while a flood of well-formed but unknown keys runs beside them from
another process, open-loop at a fixed rate (each a distinct key, so the negative cache never
helps the attacker; the worst case). Alone and flooded alternate to cancel drift; the figure
is the ratio of the medians. Also measured, with an unpaced burst of 1,000 bad keys: Redis
commands, sidecar and Envoy CPU per bad-key request, and ledger records written (none).
On two shared cores an unpaced flood takes CPU from everything else whatever it costs per
request; the per-request costs say what rate a given machine absorbs.

Run alone: `.venv/bin/python bench/bench_badkeys.py [--flood 10000]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import secrets
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.loadgen import build_request, one, run_closed_loop  # noqa: E402
from extproc.devstack.stack import Stack  # noqa: E402

BODY = json.dumps(
    {
        "model": "gpt-5-mini",
        "messages": [{"role": "user", "content": "Fix the lint error in utils.py line 3."}],
        "max_completion_tokens": 16,
    }
).encode()
POLICY = """
version: 1
workspaces:
  bench:
    budget_usd: 1000000
    upstream: {key_env: BENCH_UPSTREAM_KEY}
    rate_limits: {rpm: 100000000}
    services:
      load: {}
"""


async def _flood(port: int, total: int, concurrency: int, rate: float) -> tuple[int, float]:
    """`total` requests, each with a fresh well-formed unknown key, sent open-loop at `rate`
    per second (0: as fast as `concurrency` connections go); (401s seen, seconds)."""
    refused = 0
    sent = 0
    start = time.perf_counter()

    async def worker() -> None:
        nonlocal refused, sent
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while sent < total:
                due = start + sent / rate if rate else 0.0
                sent += 1
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)  # pacing the load, not synchronising a test
                key = "sk-ext-" + secrets.token_urlsafe(30)[:40]
                req = build_request("127.0.0.1", port, "/v1/chat/completions", BODY, key)
                status = await one(reader, writer, req)
                refused += status == 401
        finally:
            writer.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return refused, time.perf_counter() - start


def _valid_request(port: int, key: str) -> bytes:
    return build_request("127.0.0.1", port, "/v1/chat/completions", BODY, key)


def _flood_process(port: int, total: int, concurrency: int, rate: float, out: Any) -> None:
    out.put(asyncio.run(_flood(port, total, concurrency, rate)))


def _valid_beside_flood(
    port: int, key: str, flood: int, flood_concurrency: int, rate: float
) -> tuple[list[float], int, float]:
    """Valid requests at c=1 for as long as a flood runs in another process (so the load
    generator's own CPU is not what slows the valid requests down)."""
    results: Any = multiprocessing.Queue()
    proc = multiprocessing.Process(
        target=_flood_process, args=(port, flood, flood_concurrency, rate, results)
    )
    proc.start()
    latencies: list[float] = []
    while proc.is_alive() and results.empty():
        lat, _secs = asyncio.run(
            run_closed_loop("127.0.0.1", port, _valid_request(port, key), 20, 1)
        )
        latencies += lat
    refused, seconds = results.get()
    proc.join()
    return latencies, refused, seconds


def _redis_commands(stack: Stack) -> int:
    import redis

    r = redis.Redis.from_url(stack.redis_url)
    try:
        stats = r.info("commandstats")
    finally:
        r.close()
    return sum(int(v["calls"]) for k, v in stats.items() if k.startswith("cmdstat_"))


def _ledger_size(stack: Stack) -> int:
    import redis

    from extproc.store.schema import LEDGERS

    r = redis.Redis.from_url(stack.redis_url)
    try:
        return sum(int(r.xlen(s)) for s in r.smembers(LEDGERS))
    finally:
        r.close()


def bad_key_figures(
    rounds: int = 3,
    flood: int = 10_000,
    valid: int = 300,
    flood_concurrency: int = 16,
    rate: float = 250.0,
) -> dict[str, float]:
    from bench import procstat
    from bench.bench import bench_stack

    with bench_stack(POLICY) as (stack, key):
        port = stack.config.listen_port
        asyncio.run(run_closed_loop("127.0.0.1", port, _valid_request(port, key), 100, 2))
        alone: list[float] = []
        flooded: list[float] = []
        refused = 0
        flood_seconds = 0.0
        per_round = flood // rounds
        # Redis cost of bad keys alone (no valid traffic in the window).
        # The sidecar may run as a supervisor with worker processes: count the tree.
        sidecar = procstat.tree(stack.children["sidecar"].proc.pid)
        envoy = [stack.children["envoy"].proc.pid]
        commands0, ledger0 = _redis_commands(stack), _ledger_size(stack)
        cpu0, envoy0 = procstat.cpu_seconds(sidecar), procstat.cpu_seconds(envoy)
        n, _secs = asyncio.run(_flood(port, 1000, flood_concurrency, 0.0))
        sidecar_us = (procstat.cpu_seconds(sidecar) - cpu0) / max(n, 1) * 1e6
        envoy_us = (procstat.cpu_seconds(envoy) - envoy0) / max(n, 1) * 1e6
        commands_per_bad = (_redis_commands(stack) - commands0) / max(n, 1)
        ledger_growth = _ledger_size(stack) - ledger0
        for _ in range(rounds):
            lat, _ = asyncio.run(
                run_closed_loop("127.0.0.1", port, _valid_request(port, key), valid, 1)
            )
            alone += lat
            lat, got, secs = _valid_beside_flood(port, key, per_round, flood_concurrency, rate)
            flooded += lat
            refused += got
            flood_seconds += secs
    p50_alone = statistics.median(alone) * 1000
    p50_flooded = statistics.median(flooded) * 1000
    return {
        "valid p50 ms, alone": p50_alone,
        "valid p50 ms, beside the flood": p50_flooded,
        "p50 ratio (flooded / alone)": p50_flooded / p50_alone,
        "bad-key requests refused (401)": float(refused),
        "bad-key requests per second": refused / flood_seconds if flood_seconds else 0.0,
        "Redis commands per bad-key request": commands_per_bad,
        "sidecar CPU µs per bad-key request": sidecar_us,
        "Envoy CPU µs per bad-key request": envoy_us,
        "ledger records written by 1,000 bad keys": float(ledger_growth),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--flood", type=int, default=10_000)
    parser.add_argument("--valid", type=int, default=300, help="valid requests per round, c=1")
    parser.add_argument("--rate", type=float, default=250.0, help="bad-key requests per second")
    args = parser.parse_args(argv)
    figures = bad_key_figures(args.rounds, args.flood, args.valid, rate=args.rate)
    for name, value in figures.items():
        print(f"  {name:45} {value:10.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
