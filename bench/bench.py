"""`make bench`: Envoy direct vs Envoy + extproc, in the same run, against the simulator.

One Envoy process serves two listeners that differ only by the ext_proc filter, so the
difference between them is what the sidecar costs. Rounds alternate between the two
paths to cancel drift on a shared 2-core machine; ratios are the figures that matter.
Also measured: sidecar CPU per request (from /proc) and the cost of counting a
Codex-like 200k-token request, cold and with its history seen before, and the Redis bytes
the ledger keeps per request (bench/bench_redis.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.loadgen import run_closed_loop  # noqa: E402
from extproc.devstack.stack import Stack, StackConfig, free_port  # noqa: E402

SMALL_BODY = json.dumps(
    {
        "model": "gpt-5-mini",
        "messages": [{"role": "user", "content": "Fix the lint error in utils.py line 3."}],
        "max_completion_tokens": 16,
    }
).encode()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(
    stack: Stack,
    direct_port: int,
    rounds: int,
    requests: int,
    concurrency: int,
    key: str = "sk-bench",
) -> dict:
    sidecar_pid = stack.children["sidecar"].proc.pid
    envoy_pid = stack.children["envoy"].proc.pid
    result: dict[str, dict] = {}
    for name in ("direct", "extproc"):
        result[name] = {
            "latencies": [],
            "seconds": 0.0,
            "requests": 0,
            "sidecar_cpu": 0.0,
            "envoy_cpu": 0.0,
        }
    for _ in range(rounds):
        for name, port in (("direct", direct_port), ("extproc", stack.config.listen_port)):
            cpu0, envoy0 = cpu_seconds(sidecar_pid), cpu_seconds(envoy_pid)
            lat, secs = asyncio.run(
                run_closed_loop(
                    "127.0.0.1",
                    port,
                    "/v1/chat/completions",
                    SMALL_BODY,
                    requests,
                    concurrency,
                    key,
                )
            )
            r = result[name]
            r["sidecar_cpu"] += cpu_seconds(sidecar_pid) - cpu0
            r["envoy_cpu"] += cpu_seconds(envoy_pid) - envoy0
            r["latencies"] += lat
            r["seconds"] += secs
            r["requests"] += len(lat)
    summary = {}
    for name, r in result.items():
        summary[name] = {
            "p50_ms": statistics.median(r["latencies"]) * 1000,
            "p99_ms": pct(r["latencies"], 0.99) * 1000,
            "rps": r["requests"] / r["seconds"],
            "sidecar_cpu_us_per_req": r["sidecar_cpu"] / r["requests"] * 1e6,
            "envoy_cpu_us_per_req": r["envoy_cpu"] / r["requests"] * 1e6,
        }
    d, e = summary["direct"], summary["extproc"]
    summary["added_p50_ms"] = e["p50_ms"] - d["p50_ms"]
    summary["added_p99_ms"] = e["p99_ms"] - d["p99_ms"]
    summary["throughput_ratio"] = e["rps"] / d["rps"]
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--requests", type=int, default=500, help="per round and path, at c=1")
    parser.add_argument("--envoy-concurrency", type=int, default=1, help="Envoy worker threads")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "latest.json"))
    args = parser.parse_args(argv)

    from bench.bench_counting import counting_figures
    from bench.bench_redis import redis_footprint

    report: dict[str, object] = {"machine": f"{os.cpu_count()} cores", "time": time.ctime()}
    with tempfile.TemporaryDirectory(prefix="extproc-bench-") as tmp:
        direct = free_port()
        cfg = StackConfig(
            listen_port=free_port(),
            data_dir=Path(tmp),
            direct_port=direct,
            envoy_concurrency=args.envoy_concurrency,
        )
        with Stack(cfg) as stack:
            # Warm both paths (connections, tokenizer, Redis scripts).
            measure(stack, direct, 1, 100, 4)
            report["c1"] = measure(stack, direct, args.rounds, args.requests, 1)
            report["c32"] = measure(stack, direct, args.rounds, args.requests * 2, 32)
    with tempfile.TemporaryDirectory(prefix="extproc-bench-") as tmp:
        # The same, with budgets enforced: a policy, a virtual key, a reservation per request.
        policy = Path(tmp) / "policy.yaml"
        policy.write_text(BENCH_POLICY)
        direct = free_port()
        cfg = StackConfig(
            listen_port=free_port(),
            data_dir=Path(tmp),
            direct_port=direct,
            sidecar_env={"EXTPROC_POLICY": str(policy), "BENCH_UPSTREAM_KEY": "sk-bench"},
            envoy_concurrency=args.envoy_concurrency,
        )
        with Stack(cfg) as stack:
            key = _bench_key(stack.redis_url, policy)
            measure(stack, direct, 1, 100, 4, key)
            report["c1_enforced"] = measure(stack, direct, args.rounds, args.requests, 1, key)
            report["redis"] = redis_footprint(stack.redis_url)
    report["counting"] = {**counting_figures(), **request_path_figures()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print_report(report)
    return 0


BENCH_POLICY = """
version: 1
workspaces:
  bench:
    budget_usd: 1000000
    upstream: {key_env: BENCH_UPSTREAM_KEY}
    rate_limits: {rpm: 100000000}
    services:
      load: {budget_usd: 500000}
"""


def _bench_key(redis_url: str, policy: Path) -> str:
    import redis.asyncio as aioredis

    from extproc.governance.keys import KeyStore
    from extproc.governance.policy import load_policy

    async def create() -> str:
        client = aioredis.from_url(redis_url)
        try:
            secret, _ = await KeyStore(client).create("bench", "load", policy=load_policy(policy))
        finally:
            await client.aclose()
        return secret

    return asyncio.run(create())


def request_path_figures() -> dict[str, float]:
    """Sidecar CPU for the whole request body phase of a Codex-like 200k-token request:
    decode (zstd), strict JSON parse, count, once cold and once with the history seen."""
    import zstandard

    from bench.bench_counting import codex_body
    from extproc.metering.decisions import parse_request
    from extproc.metering.tokens import count_text
    from extproc.wire.endpoints import ENDPOINTS

    endpoint = ENDPOINTS["/v1/responses"]
    body = codex_body(200_000)
    first = zstandard.compress(json.dumps(body).encode())
    body["input"].append({"role": "user", "content": "and one more thing"})
    raw = json.dumps(body).encode()
    second = zstandard.compress(raw)

    def run(data: bytes) -> float:
        start = time.process_time()
        parse_request(endpoint, data, "zstd", max_body_bytes=64 << 20, count=count_text)
        return (time.process_time() - start) * 1000

    cold = run(first)
    warm = min(run(second) for _ in range(3))
    return {
        f"request body phase, cold ({len(raw) // 1024} KiB JSON, zstd)": cold,
        "request body phase, history seen + 1 turn": warm,
    }


def print_report(report: dict) -> None:
    print(f"\nextproc bench ({report['machine']}, {report['time']})")
    print(
        f"{'':12} {'path':8} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8} "
        f"{'sidecar CPU µs/req':>19} {'Envoy CPU µs/req':>17}"
    )
    for level in ("c1", "c32", "c1_enforced"):
        for name in ("direct", "extproc"):
            r = report[level][name]
            print(
                f"{level:12} {name:8} {r['p50_ms']:8.3f} {r['p99_ms']:8.3f} {r['rps']:8.0f} "
                f"{r['sidecar_cpu_us_per_req']:19.0f} {r['envoy_cpu_us_per_req']:17.0f}"
            )
        s = report[level]
        print(
            f"{level:12} added p50 {s['added_p50_ms']:+.3f} ms, p99 {s['added_p99_ms']:+.3f} ms, "
            f"throughput ratio {s['throughput_ratio']:.2f}"
        )
    redis_bytes = report.get("redis")
    if redis_bytes:
        print(f"\nRedis bytes per request ({redis_bytes['records']} ledger records):")
        for name, value in redis_bytes["bytes_per_request"].items():
            print(f"  {name:48} {value:8.1f}")
        print(f"  {'total':48} {redis_bytes['bytes_per_request_total']:8.1f}")
    print("\ncounting (sidecar CPU, ms):")
    for k, v in report["counting"].items():
        print(f"  {k:48} {v:8.2f}")


if __name__ == "__main__":
    raise SystemExit(main())
