"""`make bench`: Envoy direct vs Envoy + extproc, in the same run, against the simulator.

One Envoy serves two listeners that differ only by the ext_proc filter, so the
difference between them is what the sidecar costs. Each figure is the median of at
least three rounds, and each round runs both paths back to back, in alternating order,
so the drift of a shared machine hits both sides alike; the spread (min-max over
rounds) is printed next to every median.

Matrix: budgets enforced (policy, virtual key, reservation and settlement in Redis)
and metering only; concurrency 1, 16 and 32; a small JSON chat completion and a
50-event SSE stream. Then: enforced with 2 sidecar workers (and 2 Envoy threads)
against 1, and memory per open stream with 5,000 long streams held open at once, on fresh
stacks of their own, with what Envoy and the sidecar keep after they close (bench_memory.py).
CPU per request (sidecar process tree, Envoy, and for the whole bill Redis, the simulator
and the load generator) and RSS come from /proc; Redis bytes per request (ledger stream,
idempotency sets) from MEMORY USAGE after each enforced setup. Every run (quick too) ends
with the floor under any processor (bench/bench_floor.py: Envoy with a do-nothing ext_proc
server) and the issue-21 targets computed from the same run: enforced added p50 at c=1 and
throughput at c=32 as ratios to the floor's, taken round by round with the enforced stack and
the do-nothing processor up at once (`paired_with_floor`), sidecar and Redis CPU per request
at c=32 against their targets.

    .venv/bin/python bench/bench.py            # full run (~15 min on 2 cores)
    .venv/bin/python bench/bench.py --quick    # direction only, ~3 min
    .venv/bin/python bench/bench.py --memory   # the memory section alone
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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import procstat  # noqa: E402
from bench.bench_memory import markdown as memory_markdown  # noqa: E402
from bench.bench_memory import memory_at_scale  # noqa: E402
from bench.bench_redis import redis_footprint  # noqa: E402
from bench.loadgen import (  # noqa: E402
    CHAT_REQUEST,
    SSE_OUTPUT_TOKENS,
    SSE_REQUEST,
    build_request,
    run_closed_loop,
)
from extproc.devstack.stack import Stack, StackConfig, free_port  # noqa: E402
from extproc.simulator.plan import OUTPUT_TOKENS_HEADER  # noqa: E402

HOST = "127.0.0.1"
PATH = "/v1/chat/completions"
LOADS: dict[str, tuple[bytes, dict[str, str]]] = {
    "json": (json.dumps(CHAT_REQUEST).encode(), {}),
    "sse": (json.dumps(SSE_REQUEST).encode(), {OUTPUT_TOKENS_HEADER: str(SSE_OUTPUT_TOKENS)}),
}
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


@dataclass(frozen=True)
class Plan:
    rounds: int
    requests: dict[int, int]  # per round and path, by concurrency (JSON; SSE gets a third)
    open_streams: int  # held open at once for the memory figures
    stream_event_ms: int  # between a held stream's 50 events: it outlives opening them all


FULL = Plan(
    rounds=3, requests={1: 400, 16: 1500, 32: 2000}, open_streams=5000, stream_event_ms=1000
)
QUICK = Plan(rounds=3, requests={1: 100, 16: 300, 32: 400}, open_streams=1000, stream_event_ms=500)


class Bench:
    """One stack (a setup): its processes, key and the two ports."""

    def __init__(self, stack: Stack, direct: int, key: str) -> None:
        self.stack = stack
        self.ports = {"direct": direct, "extproc": stack.config.listen_port}
        self.key = key
        self.envoy = stack.children["envoy"].proc.pid
        self.sidecar = stack.children["sidecar"].proc.pid
        # The rest of the bill, for "where the CPU goes": every process on the path.
        self.others = {
            name: stack.children[name].proc.pid
            for name in ("redis", "simulator")
            if name in stack.children
        }

    def request(self, path: str, load: str, extra: dict[str, str] | None = None) -> bytes:
        body, headers = LOADS[load]
        return build_request(
            HOST, self.ports[path], PATH, body, self.key, {**headers, **(extra or {})}
        )

    def one_round(self, path: str, load: str, requests: int, concurrency: int) -> dict[str, float]:
        sidecar = procstat.tree(self.sidecar)
        cpu0, envoy0 = procstat.cpu_seconds(sidecar), procstat.cpu_seconds([self.envoy])
        others0 = {name: procstat.cpu_seconds([pid]) for name, pid in self.others.items()}
        loadgen0 = procstat.own_cpu_seconds()
        latencies, wall = asyncio.run(
            run_closed_loop(HOST, self.ports[path], self.request(path, load), requests, concurrency)
        )
        cpu, envoy = (
            procstat.cpu_seconds(sidecar) - cpu0,
            procstat.cpu_seconds([self.envoy]) - envoy0,
        )
        loadgen = procstat.own_cpu_seconds() - loadgen0
        others = {
            name: procstat.cpu_seconds([pid]) - others0[name] for name, pid in self.others.items()
        }
        latencies.sort()
        n = len(latencies)
        return {
            "p50_ms": statistics.median(latencies) * 1e3,
            "p99_ms": latencies[min(n - 1, int(0.99 * n))] * 1e3,
            "rps": n / wall,
            "sidecar_cpu_us": cpu / n * 1e6,
            "envoy_cpu_us": envoy / n * 1e6,
            "loadgen_cpu_us": loadgen / n * 1e6,
            **{f"{name}_cpu_us": seconds / n * 1e6 for name, seconds in others.items()},
        }

    def cell(self, load: str, concurrency: int, plan: Plan) -> dict[str, Any]:
        """`plan.rounds` rounds, direct and extproc back to back, the order alternating."""
        requests = plan.requests[concurrency] // (3 if load == "sse" else 1)
        self.one_round("direct", load, max(50, requests // 5), concurrency)  # warm both
        self.one_round("extproc", load, max(50, requests // 5), concurrency)
        rounds = []
        for i in range(plan.rounds):
            order = ("direct", "extproc") if i % 2 == 0 else ("extproc", "direct")
            rounds.append(
                {path: self.one_round(path, load, requests, concurrency) for path in order}
            )
        return summarise(rounds)


CPU_PARTS = ("loadgen", "envoy", "sidecar", "redis", "simulator")


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarise(rounds: list[dict[str, dict[str, float]]]) -> dict[str, Any]:
    def per_round(fn: Any) -> dict[str, float]:
        return spread([fn(r["direct"], r["extproc"]) for r in rounds])

    return {
        "rounds": rounds,
        "direct_p50_ms": per_round(lambda d, e: d["p50_ms"]),
        "extproc_p50_ms": per_round(lambda d, e: e["p50_ms"]),
        "added_p50_ms": per_round(lambda d, e: e["p50_ms"] - d["p50_ms"]),
        "added_p99_ms": per_round(lambda d, e: e["p99_ms"] - d["p99_ms"]),
        "direct_rps": per_round(lambda d, e: d["rps"]),
        "extproc_rps": per_round(lambda d, e: e["rps"]),
        "throughput_ratio": per_round(lambda d, e: e["rps"] / d["rps"]),
        "sidecar_cpu_us": per_round(lambda d, e: e["sidecar_cpu_us"]),
        "envoy_extra_cpu_us": per_round(lambda d, e: e["envoy_cpu_us"] - d["envoy_cpu_us"]),
        # Every process's CPU per request on both paths: the whole bill of one request, which
        # bounds throughput on a machine whose cores they all share.
        "cpu_us": {
            path: {
                name: spread([r[path][f"{name}_cpu_us"] for r in rounds])
                for name in CPU_PARTS
                if f"{name}_cpu_us" in rounds[0][path]
            }
            for path in ("direct", "extproc")
        },
    }


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


@contextmanager
def bench_stack(policy_text: str, workers: int = 1) -> Iterator[tuple[Stack, str]]:
    """A stack enforcing `policy_text`, and a key of bench/load to drive it with.

    For the side benchmarks (bad keys, Redis footprint, memory) that need one enforced setup.
    """
    with tempfile.TemporaryDirectory(prefix="extproc-bench-") as tmp:
        policy = Path(tmp) / "policy.yaml"
        policy.write_text(policy_text)
        config = StackConfig(
            listen_port=free_port(),
            data_dir=Path(tmp),
            sidecar_env={"EXTPROC_POLICY": str(policy), "BENCH_UPSTREAM_KEY": "sk-bench"},
            sidecar_workers=workers,
            envoy_concurrency=workers,
        )
        with Stack(config) as stack:
            yield stack, _bench_key(stack.redis_url, policy)


def run_setup(enforced: bool, workers: int, levels: tuple[int, ...], plan: Plan) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="extproc-bench-") as tmp:
        env = {"EXTPROC_METERING_ONLY": "1"}
        policy = Path(tmp) / "policy.yaml"
        if enforced:
            policy.write_text(BENCH_POLICY)
            env = {"EXTPROC_POLICY": str(policy), "BENCH_UPSTREAM_KEY": "sk-bench"}
        direct = free_port()
        config = StackConfig(
            listen_port=free_port(),
            data_dir=Path(tmp),
            direct_port=direct,
            sidecar_env=env,
            sidecar_workers=workers,
            envoy_concurrency=workers,
        )
        with Stack(config) as stack:
            key = _bench_key(stack.redis_url, policy) if enforced else "sk-bench"
            bench = Bench(stack, direct, key)
            cells = {}
            for load in LOADS:
                for c in levels:
                    name = f"{load} c={c}"
                    cells[name] = bench.cell(load, c, plan)
                    print(f"  {label(enforced, workers)} {name}: {line(cells[name])}", flush=True)
            result: dict[str, Any] = {"cells": cells}
            if enforced:
                result["redis"] = redis_footprint(stack.redis_url)
            return result


PAIRED_ROUNDS = 7


def paired_with_floor(plan: Plan) -> dict[str, Any]:
    """Issue 21's two ratios to the floor, measured pair by pair.

    Why: the floor's own phase runs minutes after the enforced setup's, and a shared machine
    can change its speed by 2x in between (two full runs read enforced added p50 at c=1 as
    1.3 and 2.0 ms on the same code). Here the enforced stack and the do-nothing processor are
    up at once; every round measures both, each against its own direct listener, back to
    back in alternating order, and the ratio is taken within the round. Figures are the
    median of the per-round ratios, with their range.
    """
    from bench.bench_floor import floor_rig
    from bench.bench_floor import one_round as floor_round

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="extproc-bench-") as tmp:
        policy = Path(tmp) / "policy.yaml"
        policy.write_text(BENCH_POLICY)
        direct = free_port()
        config = StackConfig(
            listen_port=free_port(),
            data_dir=Path(tmp),
            direct_port=direct,
            sidecar_env={"EXTPROC_POLICY": str(policy), "BENCH_UPSTREAM_KEY": "sk-bench"},
        )
        floor_dir = Path(tmp) / "floor"
        floor_dir.mkdir()
        with Stack(config) as stack, floor_rig(floor_dir) as (server, envoys):
            ours = Bench(stack, direct, _bench_key(stack.redis_url, policy))

            def measure(side: str, requests: int, c: int) -> tuple[float, float]:
                """(added p50 ms, throughput ratio) of one side, its two paths back to back."""
                if side == "ours":
                    d = ours.one_round("direct", "json", requests, c)
                    e = ours.one_round("extproc", "json", requests, c)
                else:
                    d = floor_round(server, *envoys["direct"], requests, c)
                    e = floor_round(server, *envoys["4 messages"], requests, c)
                return e["p50_ms"] - d["p50_ms"], e["rps"] / d["rps"]

            for c in (1, 32):
                requests = plan.requests[c]
                for side in ("ours", "floor"):  # warm both
                    measure(side, max(50, requests // 5), c)
                rounds = []
                for i in range(max(plan.rounds, PAIRED_ROUNDS)):
                    order = ("ours", "floor") if i % 2 == 0 else ("floor", "ours")
                    rounds.append({side: measure(side, requests, c) for side in order})
                out[f"c={c}"] = paired_cell(rounds)
                print(f"  paired c={c}: {_paired_line(out[f'c={c}'])}", flush=True)
    return out


def paired_cell(rounds: list[dict[str, tuple[float, float]]]) -> dict[str, Any]:
    """Each side's (added p50, throughput ratio) per round, and the two ratios taken within
    each round, as spreads."""
    return {
        "rounds": rounds,
        "ours_added_p50_ms": spread([r["ours"][0] for r in rounds]),
        "floor_added_p50_ms": spread([r["floor"][0] for r in rounds]),
        "added_p50_ratio": spread([r["ours"][0] / r["floor"][0] for r in rounds]),
        "ours_throughput": spread([r["ours"][1] for r in rounds]),
        "floor_throughput": spread([r["floor"][1] for r in rounds]),
        "throughput_ratio": spread([r["ours"][1] / r["floor"][1] for r in rounds]),
    }


def _paired_line(cell: dict[str, Any]) -> str:
    return (
        f"added p50 {fmt(cell['ours_added_p50_ms'])} / {fmt(cell['floor_added_p50_ms'])} ms "
        f"= {fmt(cell['added_p50_ratio'])}; throughput {fmt(cell['throughput_ratio'])} of the "
        "floor's"
    )


def paired_markdown(paired: dict[str, Any]) -> list[str]:
    out = [
        "| extproc and the floor, paired (JSON, enforced, 4 messages) | c | extproc added p50 ms "
        "| floor added p50 ms | added p50 ratio | throughput ratio to the floor's | rounds |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, cell in paired.items():
        out.append(
            f"| each round: both, back to back | {name.removeprefix('c=')} "
            f"| {fmt(cell['ours_added_p50_ms'])} | {fmt(cell['floor_added_p50_ms'])} "
            f"| {fmt(cell['added_p50_ratio'])} | {fmt(cell['throughput_ratio'])} "
            f"| {len(cell['rounds'])} |"
        )
    return out


def label(enforced: bool, workers: int) -> str:
    return f"{'enforced' if enforced else 'metering'}, {workers} worker{'s' * (workers > 1)}"


def fmt(s: dict[str, float], digits: int = 2, sign: bool = False, pct: bool = False) -> str:
    k = 100 if pct else 1
    spec = f"{'+' if sign else ''}.{digits}f"
    median = format(s["median"] * k, spec)
    return f"{median} [{s['min'] * k:.{digits}f}, {s['max'] * k:.{digits}f}]"


def line(c: dict[str, Any]) -> str:
    return (
        f"added p50 {fmt(c['added_p50_ms'], sign=True)} ms, "
        f"ratio {fmt(c['throughput_ratio'], 0, pct=True)} %, "
        f"sidecar {c['sidecar_cpu_us']['median']:.0f} µs/req"
    )


def markdown(report: dict[str, Any]) -> str:
    rounds = f"median of {report['rounds']} alternating rounds, [min, max] over rounds"
    out = [
        f"`make bench` ({report['kind']} run, {report['machine']}, {report['time']}"
        f"{'; ' + rounds if report['setups'] else ''})",
    ]
    if report["setups"]:
        out += [
            "",
            "| setup | load | c | p50 direct ms | p50 extproc ms | added p50 ms | req/s direct |"
            " req/s extproc | extproc/direct % | sidecar CPU µs/req | Envoy extra CPU µs/req |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
    for setup, result in report["setups"].items():
        for name, c in result["cells"].items():
            load, level = name.split(" c=")
            out.append(
                f"| {setup} | {load} | {level} | {c['direct_p50_ms']['median']:.2f} | "
                f"{c['extproc_p50_ms']['median']:.2f} | {fmt(c['added_p50_ms'], sign=True)} | "
                f"{c['direct_rps']['median']:,.0f} | {c['extproc_rps']['median']:,.0f} | "
                f"{fmt(c['throughput_ratio'], 0, pct=True)} | {fmt(c['sidecar_cpu_us'], 0)} | "
                f"{fmt(c['envoy_extra_cpu_us'], 0, sign=True)} |"
            )
    if report["setups"]:
        out += ["", *cpu_bill(report)]
    if report.get("memory"):
        out += ["", *memory_markdown(report["memory"])]
    redis = [(setup, r["redis"]) for setup, r in report["setups"].items() if "redis" in r]
    if redis:
        out += ["", "| Redis bytes per request (bench/bench_redis.py) | records | stream | "
                "idempotency | total |", "|---|---|---|---|---|"]  # fmt: skip
        for setup, f in redis:
            per = f["bytes_per_request"]
            out.append(
                f"| {setup} | {f['records']:,} | {per.get('ledger stream', 0):.0f} | "
                f"{per.get('idempotency (seen sets)', 0):.0f} | "
                f"{f['bytes_per_request_total']:.0f} |"
            )
    if "floor" in report:
        from bench.bench_floor import markdown as floor_markdown

        out += ["", *floor_markdown(report["floor"])]
    if report.get("paired"):
        out += ["", *paired_markdown(report["paired"])]
    if report.get("targets"):
        out += ["", *targets_markdown(report["targets"])]
    if "counting" in report:
        out += ["", "| counting (sidecar CPU) | ms |", "|---|---|"]
        out += [f"| {k} | {v:.2f} |" for k, v in report["counting"].items()]
    if "bad_keys" in report:
        out += ["", "| bad-key flood (bench/bench_badkeys.py) | |", "|---|---|"]
        out += [f"| {k} | {v:.3f} |" for k, v in report["bad_keys"].items()]
    return "\n".join(out) + "\n"


ENFORCED = "enforced, 1 worker"
PORTKEY_ADDED_P50_MS = 1.54
"""Portkey's gateway (routing only, no budgets), added p50 at c=1, measured beside ours on
another day (issue 21); not part of this run, so its line is marked as such."""


def _ratio(top: dict[str, float], bottom: dict[str, float]) -> dict[str, float]:
    """median over median, and the widest range the two spreads allow."""
    return {
        "median": top["median"] / bottom["median"],
        "min": top["min"] / bottom["max"],
        "max": top["max"] / bottom["min"],
    }


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 21's targets, each computed from this run: enforced against the do-nothing
    processor (bench_floor.py, 4 messages) measured in the same run, or against a figure."""
    cells = report["setups"].get(ENFORCED, {}).get("cells", {})
    floor = report.get("floor", {})
    c1, c32 = cells.get("json c=1"), cells.get("json c=32")
    f1, f32 = floor.get("4 messages c=1"), floor.get("4 messages c=32")
    out: list[dict[str, Any]] = []
    paired = report.get("paired", {})
    p1, p32 = paired.get("c=1"), paired.get("c=32")
    if p1:  # the same two ratios, taken within each round (`paired_with_floor`): preferred
        c1 = {"added_p50_ms": p1["ours_added_p50_ms"]}
        f1 = {"added_p50_ms": p1["floor_added_p50_ms"]}
    if p32:
        c32 = {**(c32 or {}), "throughput_ratio": p32["ours_throughput"]}
        f32 = {"throughput_ratio": p32["floor_throughput"]}
    if c1 and f1:
        out.append({
            "target": "added p50 at c=1, enforced / do-nothing", "goal": "<= 1.5",
            "value": p1["added_p50_ratio"] if p1
                     else _ratio(c1["added_p50_ms"], f1["added_p50_ms"]),
            "limit": 1.5, "below": True,
            "detail": f"{c1['added_p50_ms']['median']:.2f} / {f1['added_p50_ms']['median']:.2f} ms",
        })  # fmt: skip
        portkey = {k: PORTKEY_ADDED_P50_MS / v for k, v in c1["added_p50_ms"].items()}
        portkey["min"], portkey["max"] = portkey["max"], portkey["min"]
        out.append({
            "target": "ahead of Portkey at c=1: its added p50 / ours", "goal": ">= 1.5",
            "value": portkey, "limit": 1.5, "below": False,
            "detail": f"{PORTKEY_ADDED_P50_MS:.2f} ms (another day's figure) / "
                      f"{c1['added_p50_ms']['median']:.2f} ms",
        })  # fmt: skip
    if c32 and f32:
        out.append({
            "target": "throughput at c=32, enforced / do-nothing", "goal": ">= 0.7",
            "value": p32["throughput_ratio"] if p32
                     else _ratio(c32["throughput_ratio"], f32["throughput_ratio"]),
            "limit": 0.7,
            "below": False,
            "detail": f"{100 * c32['throughput_ratio']['median']:.0f}% / "
                      f"{100 * f32['throughput_ratio']['median']:.0f}% of direct",
        })  # fmt: skip
    if c32:
        parts = c32.get("cpu_us", {}).get("extproc", {})
        for name, limit in (("sidecar", 300.0), ("redis", 100.0)):
            if name in parts:
                spread_us = parts[name]
                out.append({
                    "target": f"{'Redis' if name == 'redis' else 'sidecar'} CPU per request at "
                              "c=32, measured / target",
                    "goal": f"<= 1 ({limit:.0f} µs)",
                    "value": {k: v / limit for k, v in spread_us.items()}, "limit": 1.0,
                    "below": True, "detail": f"{spread_us['median']:.0f} µs",
                })  # fmt: skip
    for row in out:
        value, limit = row["value"], row["limit"]
        row["met"] = value["median"] <= limit if row["below"] else value["median"] >= limit
    return out


def targets_markdown(rows: list[dict[str, Any]]) -> list[str]:
    out = [
        "| issue 21 target (JSON, this run) | goal | ratio, median [range] | from | met |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        out.append(
            f"| {row['target']} | {row['goal']} | {fmt(row['value'])} | {row['detail']} | "
            f"{'yes' if row['met'] else 'no'} |"
        )
    return out


def cpu_bill(report: dict[str, Any]) -> list[str]:
    """Where one request's CPU goes, process by process, JSON cells (medians, µs/request)."""
    out = [
        "| CPU µs per request (JSON) | c | path | load generator | Envoy | sidecar | Redis |"
        " simulator | total |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for setup, result in report["setups"].items():
        for name, c in result["cells"].items():
            load, level = name.split(" c=")
            if load != "json" or "cpu_us" not in c:
                continue
            for path, parts in c["cpu_us"].items():
                figures = [parts.get(p, {"median": 0.0})["median"] for p in CPU_PARTS]
                cells = " | ".join(f"{f:,.0f}" for f in figures)
                out.append(f"| {setup} | {level} | {path} | {cells} | {sum(figures):,.0f} |")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests: direction only")
    parser.add_argument("--rounds", type=int, help="rounds per figure (at least 3)")
    parser.add_argument("--no-workers", action="store_true", help="skip the 2-worker setup")
    parser.add_argument(
        "--memory", action="store_true", help="only the memory figures (streams held open)"
    )
    parser.add_argument("--out", help="default: bench/results/latest.json (--memory: memory.json)")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.rounds:
        if args.rounds < 3:
            parser.error("--rounds: a median needs at least 3 rounds")
        plan = Plan(args.rounds, plan.requests, plan.open_streams, plan.stream_event_ms)
    results = ROOT / "bench" / "results"
    args.out = args.out or str(results / ("memory.json" if args.memory else "latest.json"))
    report: dict[str, Any] = {
        "kind": ("quick" if args.quick else "full") + (" memory-only" if args.memory else ""),
        "machine": f"{os.cpu_count()} cores",
        "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "rounds": plan.rounds,
        "setups": {},
    }
    setups = [(True, 1, (1, 16, 32)), (False, 1, (1, 16, 32))]
    if not args.no_workers:
        setups.append((True, 2, (16, 32)))
    for enforced, workers, levels in [] if args.memory else setups:
        print(f"{label(enforced, workers)}:", flush=True)
        report["setups"][label(enforced, workers)] = run_setup(enforced, workers, levels, plan)
    report["memory"] = []
    for workers in (1,) if args.no_workers else (1, 2):
        print(f"memory, {plan.open_streams:,} streams, {workers} worker(s):", flush=True)
        report["memory"].append(memory_at_scale(plan.open_streams, workers, plan.stream_event_ms))
    if not args.quick and not args.memory:
        from bench.bench_counting import counting_figures, request_path_figures

        report["counting"] = {**counting_figures(), **request_path_figures()}
        from bench.bench_badkeys import bad_key_figures

        report["bad_keys"] = bad_key_figures()
    if not args.memory:
        from bench.bench_floor import floor_figures

        print("do-nothing processor (the floor):", flush=True)
        report["floor"] = floor_figures(quick=args.quick, rounds=plan.rounds)
        print("extproc and the floor, round by round (issue 21's ratios):", flush=True)
        report["paired"] = paired_with_floor(plan)
        report["targets"] = targets(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    table = markdown(report)
    out.with_suffix(".md").write_text(table)
    print("\n" + table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
