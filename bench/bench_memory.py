"""Memory per open stream at scale: Envoy and the sidecar holding 5,000 streamed calls at once,
and what they keep after the streams close.

Each figure comes from a stack of its own, started for it: measured after the throughput
rounds, the allocators would already hold free pages from those and a new stream would cost
less than it does on a fresh pod (the 7-11 KiB per stream this bench once printed; a hostile
test measured about 86 KiB). Per stream is (RSS with every stream open - RSS idle) / streams:
what a pod must budget, allocator growth included. Envoy's own count of allocated bytes (admin
`/memory`) is shown beside its RSS: after the streams close it falls back while RSS stays near
the peak, because the allocator keeps the pages it grew into (the next burst reuses them).

    .venv/bin/python bench/bench.py --memory        # this section only (5,000 streams)
    .venv/bin/python bench/bench_memory.py 1000     # a smaller run, 1 worker
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import procstat  # noqa: E402
from bench.loadgen import (  # noqa: E402
    CHAT_REQUEST,
    SSE_OUTPUT_TOKENS,
    SSE_REQUEST,
    build_request,
    run_closed_loop,
    streams_held_open,
)
from extproc.simulator.plan import OUTPUT_TOKENS_HEADER  # noqa: E402

HOST = "127.0.0.1"
PATH = "/v1/chat/completions"
MIB = 1 << 20


def _admin(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=10) as resp:
        return json.loads(resp.read())


def _envoy_allocated(admin_port: int) -> int:
    return int(_admin(admin_port, "/memory")["allocated"])


def _downstream_connections(admin_port: int) -> int:
    stats = _admin(
        admin_port, "/stats?format=json&filter=^http.openai_egress.downstream_cx_active$"
    )
    return sum(int(s.get("value", 0)) for s in stats["stats"])


class _Sampler:
    def __init__(self, envoy: int, sidecar: int, admin_port: int) -> None:
        self.envoy, self.sidecar, self.admin_port = envoy, sidecar, admin_port

    def __call__(self) -> dict[str, int]:
        return {
            "envoy_rss": procstat.rss_bytes([self.envoy]),
            "envoy_allocated": _envoy_allocated(self.admin_port),
            "sidecar_rss": procstat.rss_bytes(procstat.tree(self.sidecar)),
        }


def memory_at_scale(streams: int, workers: int = 1, event_ms: int = 1000) -> dict[str, Any]:
    """Hold `streams` streamed calls open through a fresh enforced stack; RSS before, during
    and after. Each stream is 50 events `event_ms` apart: it outlives the time to open all."""
    from bench.bench import BENCH_POLICY, bench_stack

    with bench_stack(BENCH_POLICY, workers=workers) as (stack, key):
        port, admin = stack.config.listen_port, stack.admin_port
        sample = _Sampler(
            stack.children["envoy"].proc.pid, stack.children["sidecar"].proc.pid, admin
        )
        warm = build_request(HOST, port, PATH, json.dumps(CHAT_REQUEST).encode(), key)
        asyncio.run(run_closed_loop(HOST, port, warm, 50, 4))  # tokenizers, pools, caches
        idle_connections = _downstream_connections(admin)
        idle = sample()
        headers = {
            OUTPUT_TOKENS_HEADER: str(SSE_OUTPUT_TOKENS),
            "x-sim-fault": f"event-delay-ms={event_ms}",
        }
        request = build_request(HOST, port, PATH, json.dumps(SSE_REQUEST).encode(), key, headers)

        async def hold() -> tuple[dict[str, int], float]:
            began = time.monotonic()
            async with streams_held_open(HOST, port, request, streams, timeout=600) as tasks:
                opened = time.monotonic() - began
                peaks: dict[str, int] = {}
                for _ in range(4):  # RSS moves as the allocator works: keep the peak
                    for name, value in sample().items():
                        peaks[name] = max(peaks.get(name, 0), value)
                    await asyncio.sleep(event_ms / 4000)  # spacing samples, not synchronising
            statuses = Counter(t.result() for t in tasks)
            assert statuses == {200: streams}, f"held streams answered {dict(statuses)}"
            return peaks, opened

        held, opened = asyncio.run(hold())
        # "After": every client connection Envoy held is gone (polling its own count).
        deadline = time.monotonic() + 60
        while _downstream_connections(admin) > idle_connections and time.monotonic() < deadline:
            time.sleep(0.2)  # polling Envoy's connection gauge, not synchronising on time
        after = sample()

    def per_stream(name: str) -> float:
        return (held[name] - idle[name]) / streams / 1024

    return {
        "streams": streams,
        "workers": workers,
        "seconds_to_open": round(opened, 1),
        "envoy_kib_per_stream": per_stream("envoy_rss"),
        "envoy_allocated_kib_per_stream": per_stream("envoy_allocated"),
        "sidecar_kib_per_stream": per_stream("sidecar_rss"),
        "mib": {
            phase: {name: value / MIB for name, value in figures.items()}
            for phase, figures in (("idle", idle), ("open", held), ("after", after))
        },
    }


def markdown(figures: list[dict[str, Any]]) -> list[str]:
    out = [
        "| memory (bench/bench_memory.py) | open SSE streams | Envoy KiB/stream (allocated) |"
        " sidecar KiB/stream | Envoy RSS MiB idle / open / after (allocated after) |"
        " sidecar RSS MiB idle / open / after |",
        "|---|---|---|---|---|---|",
    ]
    for f in figures:
        m = f["mib"]
        envoy = " / ".join(f"{m[p]['envoy_rss']:.0f}" for p in ("idle", "open", "after"))
        sidecar = " / ".join(f"{m[p]['sidecar_rss']:.0f}" for p in ("idle", "open", "after"))
        workers = f"{f['workers']} worker{'s' * (f['workers'] > 1)}"
        out.append(
            f"| enforced, {workers} | {f['streams']:,} | {f['envoy_kib_per_stream']:.1f} "
            f"({f['envoy_allocated_kib_per_stream']:.1f}) | {f['sidecar_kib_per_stream']:.1f} | "
            f"{envoy} ({m['after']['envoy_allocated']:.0f}) | {sidecar} |"
        )
    return out


if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    result = memory_at_scale(count)
    print(json.dumps(result, indent=2))
    print("\n".join(markdown([result])))
