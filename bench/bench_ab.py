"""A/B of two sidecars in one run: alternating rounds, medians with spread, one record each.

Why: on two shared cores the absolute figures move by 2x with the machine's state, so a
change is judged only as a ratio measured in the same run. Two enforced stacks (the bench
policy and key, each with its own Redis, simulator and Envoy) are up at once; each round
drives both, A then B or B then A (alternating), with the same closed loop, and reads per
request from /proc and Redis:

  p50_ms, rps         the closed loop's latency median and throughput
  added_p50_ms        p50 less the same stack's direct listener (no ext_proc) in the same
                      round (`--added`; doubles the time, so off by default at c > 1)
  sidecar_us          CPU of the sidecar's process tree (every worker and the supervisor)
  redis_us, envoy_us  CPU of that stack's Redis and Envoy
  busiest             the busiest worker's share of the sidecar CPU (several workers)
  evalsha, commands   script calls and commands Redis ran (inside scripts too), per request

Each figure prints as median [min, max] over the rounds for A and B, and the median of the
per-round B/A ratios. At the end every side's ledger must hold exactly one record per
request sent (warm-up included), each request id once: an A/B that loses or doubles a record
is refused, whatever its speed.

What differs between A and B:

  --a-code REF        A runs extproc as of git revision REF (exported to a temporary
                      directory and put first on its PYTHONPATH); B runs this checkout
  --a-env K=V, --b-env K=V    extra sidecar environment per side
  --a-stack K=V, --b-stack K=V  StackConfig fields per side (e.g. worker_endpoints=false)
  --fresh             new stacks every round (what a connection-time choice needs, e.g.
                      the kernel's SO_REUSEPORT spreading: it is drawn once per stack)

    .venv/bin/python bench/bench_ab.py --a-code main --concurrency 32 --rounds 7
    .venv/bin/python bench/bench_ab.py --workers 2 --envoy-threads 2 --fresh \\
        --a-stack worker_endpoints=false --rounds 6
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import procstat  # noqa: E402
from bench.bench import BENCH_POLICY, HOST, LOADS, PATH, _bench_key  # noqa: E402
from bench.loadgen import build_request, run_closed_loop  # noqa: E402
from extproc.devstack.stack import Stack, StackConfig, free_port  # noqa: E402


@dataclass
class Side:
    """One side of the A/B: how its stack differs, and what it was sent."""

    name: str
    env: dict[str, str] = field(default_factory=dict)
    stack: dict[str, Any] = field(default_factory=dict)
    sent: int = 0
    rounds: list[dict[str, float]] = field(default_factory=list)


def export_revision(revision: str, into: Path) -> Path:
    """`extproc/` as of `revision`, unpacked under `into` (a PYTHONPATH entry)."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", revision, "extproc"], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def _redis_counts(stack: Stack) -> tuple[int, int]:
    """(EVALSHA calls, every command run, those inside scripts included)."""
    import redis

    with redis.Redis.from_url(stack.redis_url) as client:
        stats = client.info("commandstats")
    evalsha = int(stats.get("cmdstat_evalsha", {}).get("calls", 0))
    return evalsha, sum(int(v.get("calls", 0)) for v in stats.values())


def _sidecar_pids(stack: Stack) -> list[int]:
    return [
        pid
        for name, child in stack.children.items()
        if name.startswith("sidecar")
        for pid in procstat.tree(child.proc.pid)
    ]


def one_round(stack: Stack, key: str, port: int, n: int, c: int, load: str) -> dict[str, float]:
    body, headers = LOADS[load]
    request = build_request(HOST, port, PATH, body, key, headers)
    side = _sidecar_pids(stack)
    redis = [stack.children["redis"].proc.pid]
    envoy = [stack.children["envoy"].proc.pid]
    cpu0 = {pid: procstat.cpu_seconds([pid]) for pid in side}
    r0, e0 = procstat.cpu_seconds(redis), procstat.cpu_seconds(envoy)
    calls0 = _redis_counts(stack)
    latencies, wall = asyncio.run(run_closed_loop(HOST, port, request, n, c))
    calls1 = _redis_counts(stack)
    per = sorted((procstat.cpu_seconds([pid]) - t for pid, t in cpu0.items()), reverse=True)
    k = len(latencies)
    return {
        "p50_ms": statistics.median(latencies) * 1e3,
        "rps": k / wall,
        "sidecar_us": sum(per) / k * 1e6,
        "redis_us": (procstat.cpu_seconds(redis) - r0) / k * 1e6,
        "envoy_us": (procstat.cpu_seconds(envoy) - e0) / k * 1e6,
        "busiest": per[0] / max(sum(per), 1e-9),
        "evalsha": (calls1[0] - calls0[0]) / k,
        "commands": (calls1[1] - calls0[1]) / k,
    }


@contextlib.contextmanager
def enforced_stack(tmp: Path, args: argparse.Namespace, side: Side) -> Iterator[tuple[Stack, str]]:
    tmp.mkdir(parents=True, exist_ok=True)
    policy = tmp / "policy.yaml"
    policy.write_text(args.policy.read_text() if args.policy else BENCH_POLICY)
    env = {"EXTPROC_POLICY": str(policy), "BENCH_UPSTREAM_KEY": "sk-bench", **side.env}
    config = StackConfig(
        listen_port=free_port(),
        data_dir=tmp,
        sidecar_env=env,
        direct_port=free_port(),
        sidecar_workers=args.workers,
        envoy_concurrency=args.envoy_threads,
        **side.stack,
    )
    with Stack(config) as stack:
        yield stack, _bench_key(stack.redis_url, policy)


def ledger_check(stack: Stack, sent: int, timeout: float = 60.0) -> tuple[int, int]:
    """(records, distinct request ids) in the bench ledger once the writer has caught up."""
    import redis

    from extproc.store.schema import ledger_key, workspace_prefix
    from extproc.v1.ledger_pb2 import UsageRecord

    stream = ledger_key(workspace_prefix("bench"))
    with redis.Redis.from_url(stack.redis_url) as client:
        deadline = time.monotonic() + timeout
        while int(client.xlen(stream)) < sent and time.monotonic() < deadline:
            time.sleep(0.2)  # the ledger writer drains in the background
        ids = [
            UsageRecord.FromString(fields[b"r"]).request_id for _id, fields in client.xrange(stream)
        ]
    return len(ids), len(set(ids))


def _drive(stack: Stack, key: str, side: Side, args: argparse.Namespace, warm: bool) -> None:
    port = stack.config.listen_port
    if warm:
        warmup = max(200, args.requests // 5)
        one_round(stack, key, port, warmup, args.concurrency, args.load)
        side.sent += warmup
    row = one_round(stack, key, port, args.requests, args.concurrency, args.load)
    side.sent += args.requests
    if args.added:
        direct = stack.config.direct_port
        assert direct is not None
        plain = one_round(stack, key, direct, args.requests, args.concurrency, args.load)
        row["added_p50_ms"] = row["p50_ms"] - plain["p50_ms"]
    side.rounds.append(row)


def _check(stack: Stack, side: Side) -> str:
    records, distinct = ledger_check(stack, side.sent)
    verdict = "ok" if records == distinct == side.sent else "MISMATCH"
    return f"{side.name}: {records} records, {distinct} request ids, {side.sent} sent: {verdict}"


def run(args: argparse.Namespace, a: Side, b: Side) -> list[str]:
    checks: list[str] = []
    with tempfile.TemporaryDirectory(prefix="extproc-ab-") as tmp:
        os.chdir(tmp)  # `python -m extproc` must not find this checkout first (--a-code)
        if args.a_code:
            code = export_revision(args.a_code, Path(tmp) / "a-code")
            a.env["PYTHONPATH"] = str(code)
        if args.fresh:
            for i in range(args.rounds):
                for side in (a, b) if i % 2 == 0 else (b, a):
                    side.sent = 0
                    where = Path(tmp) / f"{side.name}{i}"
                    with enforced_stack(where, args, side) as (stack, key):
                        _drive(stack, key, side, args, warm=True)
                        checks.append(_check(stack, side))
            return checks
        with contextlib.ExitStack() as es:
            stacks = {
                s.name: es.enter_context(enforced_stack(Path(tmp) / s.name, args, s))
                for s in (a, b)
            }
            for side in (a, b):
                stack, key = stacks[side.name]
                warmup = max(200, args.requests // 5)
                one_round(stack, key, stack.config.listen_port, warmup, args.concurrency, args.load)
                side.sent += warmup
                side.rounds.clear()
            for i in range(args.rounds):
                for side in (a, b) if i % 2 == 0 else (b, a):
                    stack, key = stacks[side.name]
                    _drive(stack, key, side, args, warm=False)
            for side in (a, b):
                checks.append(_check(stacks[side.name][0], side))
    return checks


def report(args: argparse.Namespace, a: Side, b: Side, checks: list[str]) -> str:
    out = [
        f"A/B, {args.load} c={args.concurrency}, {args.rounds} alternating rounds of "
        f"{args.requests}{' (fresh stacks each round)' if args.fresh else ''}; "
        f"workers {args.workers}, Envoy threads {args.envoy_threads}",
        f"A: code {args.a_code or 'this checkout'} env {a.env} stack {a.stack}",
        f"B: code this checkout env {b.env} stack {b.stack}",
        "",
        "| per request | A median [min, max] | B median [min, max] | B/A (per-round median) |",
        "|---|---|---|---|",
    ]
    for metric in a.rounds[0]:
        cells = []
        for side in (a, b):
            v = [r[metric] for r in side.rounds]
            cells.append(f"{statistics.median(v):.3f} [{min(v):.3f}, {max(v):.3f}]")
        ratios = [
            rb[metric] / ra[metric] for ra, rb in zip(a.rounds, b.rounds, strict=True) if ra[metric]
        ]
        ratio = f"{statistics.median(ratios):.3f}" if ratios else "-"
        out.append(f"| {metric} | {cells[0]} | {cells[1]} | {ratio} |")
    out += ["", *checks]
    return "\n".join(out)


def _pairs(values: list[str]) -> dict[str, str]:
    return dict(v.split("=", 1) for v in values)


def _stack_fields(values: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, text in _pairs(values).items():
        if text.lower() in ("true", "false"):
            out[name] = text.lower() == "true"
        elif text.isdigit():
            out[name] = int(text)
        else:
            out[name] = text
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=3000, help="per round and side")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--load", default="json", choices=sorted(LOADS))
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--envoy-threads", type=int, default=1)
    p.add_argument("--added", action="store_true", help="measure added p50 against direct")
    p.add_argument("--fresh", action="store_true", help="new stacks every round")
    p.add_argument("--policy", type=Path, help="a policy file instead of the bench's")
    p.add_argument("--a-code", help="git revision A runs (default: this checkout)")
    for side in ("a", "b"):
        p.add_argument(f"--{side}-env", action="append", default=[], metavar="K=V")
        p.add_argument(f"--{side}-stack", action="append", default=[], metavar="FIELD=V")
    p.add_argument("--out", type=Path, help="also write the report here")
    args = p.parse_args(argv)
    args.policy = args.policy.resolve() if args.policy else None
    args.out = args.out.resolve() if args.out else None  # the run changes directory
    if args.rounds < 3:
        p.error("--rounds: a median needs at least 3 rounds")
    a = Side("A", _pairs(args.a_env), _stack_fields(args.a_stack))
    b = Side("B", _pairs(args.b_env), _stack_fields(args.b_stack))
    checks = run(args, a, b)
    text = report(args, a, b, checks)
    print(text, flush=True)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if all(line.endswith(": ok") for line in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
