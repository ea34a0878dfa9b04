"""The floor under any ext_proc sidecar: Envoy with a processor that does nothing.

Why: the issue-10 targets (added p50 ≤ 1 ms at c=1, Envoy's extra CPU ≤ 100 µs per request)
are only meaningful next to what Envoy's ext_proc filter costs by itself. Here the processor
answers every message with an empty "continue" (our own HTTP/2 transport, the cheapest server
we measured), so everything above direct is Envoy's filter, its gRPC client and the transport.
The same Envoy runs one listener per processing mode, in front of the same simulator:

  direct      no ext_proc filter
  4 messages  the sidecar's modes: request headers, buffered request body, response headers,
              buffered response body
  3 messages  response headers skipped (what `mode_override` from the request-headers reply
              could do), response body buffered
  2 messages  request headers and body only (no response seen: not an option for metering,
              shown as the lower bound)

Rounds alternate the order of the listeners; figures are medians with [min, max].

    .venv/bin/python bench/bench_floor.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import procstat  # noqa: E402
from bench.bench_h2grpc import CHAT_BODY, envoy_config, wait_ready  # noqa: E402
from bench.loadgen import build_request, run_closed_loop  # noqa: E402
from extproc.devstack.stack import Child, envoy_binary, free_port  # noqa: E402

MODES: dict[str, dict[str, str] | None] = {
    "direct": None,
    "4 messages": {
        "request_header_mode": "SEND",
        "request_body_mode": "BUFFERED",
        "response_header_mode": "SEND",
        "response_body_mode": "BUFFERED",
    },
    "3 messages": {
        "request_header_mode": "SEND",
        "request_body_mode": "BUFFERED",
        "response_header_mode": "SKIP",
        "response_body_mode": "BUFFERED",
    },
    "2 messages": {
        "request_header_mode": "SEND",
        "request_body_mode": "BUFFERED",
        "response_header_mode": "SKIP",
        "response_body_mode": "NONE",
    },
}


def listener_config(mode: str, listen: int, admin: int, grpc: int, upstream: int) -> dict[str, Any]:
    config = envoy_config(listen, admin, grpc, upstream)
    listener = config["static_resources"]["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    processing = MODES[mode]
    if processing is None:
        hcm["http_filters"] = hcm["http_filters"][1:]
    else:
        hcm["http_filters"][0]["typed_config"]["processing_mode"] = processing
    return config


@contextmanager
def floor_rig(tmp: Path) -> Iterator[tuple[Child, dict[str, tuple[Child, int]]]]:
    """The do-nothing processor, the simulator and one Envoy per mode."""
    grpc, upstream = free_port(), free_port()
    with ExitStack() as stack:
        server = Child(
            "processor",
            [
                sys.executable,
                str(ROOT / "bench" / "bench_h2grpc.py"),
                "--serve",
                "ours",
                "--port",
                str(grpc),
                "--loop",
                "uvloop",
            ],
        )
        stack.callback(server.stop)
        server.wait_for_line("ready")
        simulator = [sys.executable, "-m", "extproc.simulator", "--port", str(upstream)]
        sim = Child("simulator", simulator)
        stack.callback(sim.stop)
        sim.wait_for_line("listening")
        envoys: dict[str, tuple[Child, int]] = {}
        for mode in MODES:
            listen, admin = free_port(), free_port()
            path = tmp / f"envoy-{len(envoys)}.json"
            path.write_text(json.dumps(listener_config(mode, listen, admin, grpc, upstream)))
            argv = [envoy_binary(), "-c", str(path), "--concurrency", "1", "--disable-hot-restart"]
            envoy = Child(f"envoy-{mode}", [*argv, "--base-id", str(free_port()), "-l", "warning"])
            stack.callback(envoy.stop)
            wait_ready(admin, envoy)
            envoys[mode] = (envoy, listen)
        yield server, envoys


def one_round(
    server: Child, envoy: Child, listen: int, requests: int, concurrency: int
) -> dict[str, float]:
    request = build_request("127.0.0.1", listen, "/v1/chat/completions", CHAT_BODY, "sk-bench")
    envoy0 = procstat.cpu_seconds([envoy.proc.pid])
    server0 = procstat.cpu_seconds([server.proc.pid])
    latencies, wall = asyncio.run(
        run_closed_loop("127.0.0.1", listen, request, requests, concurrency)
    )
    n = len(latencies)
    return {
        "p50_ms": statistics.median(latencies) * 1e3,
        "rps": n / wall,
        "envoy_cpu_us": (procstat.cpu_seconds([envoy.proc.pid]) - envoy0) / n * 1e6,
        "processor_cpu_us": (procstat.cpu_seconds([server.proc.pid]) - server0) / n * 1e6,
    }


def floor_figures(quick: bool = False, rounds: int = 3) -> dict[str, dict[str, Any]]:
    """Per mode and concurrency: added p50, Envoy's extra CPU, processor CPU, throughput ratio."""
    plan = {1: 150 if quick else 500, 32: 500 if quick else 2000}
    out: dict[str, dict[str, Any]] = {}
    with (
        tempfile.TemporaryDirectory(prefix="extproc-floor-") as tmp,
        floor_rig(Path(tmp)) as (server, envoys),
    ):
        for concurrency, requests in plan.items():
            for envoy, listen in envoys.values():  # warm every listener
                one_round(server, envoy, listen, max(50, requests // 5), concurrency)
            results: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
            for i in range(rounds):
                order = list(MODES) if i % 2 == 0 else list(reversed(MODES))
                for mode in order:
                    envoy, listen = envoys[mode]
                    results[mode].append(one_round(server, envoy, listen, requests, concurrency))
            direct = results["direct"]
            for mode in MODES:
                if mode == "direct":
                    continue
                rows = list(zip(direct, results[mode], strict=True))
                out[f"{mode} c={concurrency}"] = {
                    "added_p50_ms": _spread([m["p50_ms"] - d["p50_ms"] for d, m in rows]),
                    "envoy_extra_cpu_us": _spread(
                        [m["envoy_cpu_us"] - d["envoy_cpu_us"] for d, m in rows]
                    ),
                    "processor_cpu_us": _spread([m["processor_cpu_us"] for _, m in rows]),
                    "throughput_ratio": _spread([m["rps"] / d["rps"] for d, m in rows]),
                }
    return out


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def markdown(figures: dict[str, dict[str, Any]]) -> list[str]:
    def cell(s: dict[str, float], digits: int, k: float = 1.0) -> str:
        low, high = s["min"] * k, s["max"] * k
        return f"{s['median'] * k:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"

    out = [
        "| do-nothing processor (bench/bench_floor.py) | c | added p50 ms |"
        " Envoy extra CPU µs/req | processor CPU µs/req | extproc/direct % |",
        "|---|---|---|---|---|---|",
    ]
    for name, f in figures.items():
        mode, level = name.split(" c=")
        out.append(
            f"| {mode} | {level} | {cell(f['added_p50_ms'], 2)} | "
            f"{cell(f['envoy_extra_cpu_us'], 0)} | {cell(f['processor_cpu_us'], 0)} | "
            f"{cell(f['throughput_ratio'], 0, 100)} |"
        )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print("\n".join(markdown(floor_figures(args.quick, args.rounds))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
