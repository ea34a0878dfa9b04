"""The bench's report tables, from synthetic rounds: the arithmetic, not the timing."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

from bench.bench import cpu_bill, markdown, summarise, targets  # noqa: E402
from bench.bench_floor import markdown as floor_markdown  # noqa: E402
from bench.bench_memory import markdown as memory_markdown  # noqa: E402


def _round(scale: float) -> dict[str, dict[str, float]]:
    direct = {
        "p50_ms": 1.0,
        "p99_ms": 2.0,
        "rps": 1000.0,
        "sidecar_cpu_us": 0.0,
        "envoy_cpu_us": 150.0,
        "loadgen_cpu_us": 50.0,
        "redis_cpu_us": 0.0,
        "simulator_cpu_us": 200.0,
    }
    extproc = {
        "p50_ms": 3.0 * scale,
        "p99_ms": 5.0,
        "rps": 250.0 * scale,
        "sidecar_cpu_us": 900.0 * scale,
        "envoy_cpu_us": 550.0,
        "loadgen_cpu_us": 90.0,
        "redis_cpu_us": 270.0,
        "simulator_cpu_us": 260.0,
    }
    return {"direct": direct, "extproc": extproc}


def test_summary_keeps_every_process_bill_with_its_spread() -> None:
    cell = summarise([_round(1.0), _round(2.0), _round(1.5)])
    assert cell["throughput_ratio"] == {"median": 0.375, "min": 0.25, "max": 0.5}
    assert cell["envoy_extra_cpu_us"]["median"] == 400.0
    assert cell["cpu_us"]["extproc"]["sidecar"] == {"median": 1350.0, "min": 900.0, "max": 1800.0}
    assert cell["cpu_us"]["direct"]["simulator"]["median"] == 200.0


def test_cpu_bill_rows_add_up_per_path() -> None:
    cell = summarise([_round(1.0), _round(1.0), _round(1.0)])
    report = {
        "kind": "quick",
        "machine": "2 cores",
        "time": "t",
        "rounds": 3,
        "setups": {"enforced, 1 worker": {"cells": {"json c=32": cell, "sse c=32": cell}}},
    }
    rows = cpu_bill(report)
    assert len(rows) == 4  # header, rule, direct, extproc: SSE cells are left out
    direct, extproc = (r.strip("|").split("|") for r in rows[2:])
    assert direct[-1].strip() == "400"  # 50 + 150 + 0 + 0 + 200
    assert extproc[-1].strip() == "2,070"  # 90 + 550 + 900 + 270 + 260
    assert "| CPU µs per request (JSON)" in markdown(report)


def test_floor_table_names_mode_and_concurrency() -> None:
    spread = {"median": 0.5, "min": 0.25, "max": 1.0}
    figures = {
        "4 messages c=1": {
            "added_p50_ms": spread,
            "envoy_extra_cpu_us": spread,
            "processor_cpu_us": spread,
            "throughput_ratio": spread,
        }
    }
    row = floor_markdown(figures)[2]
    assert row.startswith("| 4 messages | 1 | 0.50 [0.25, 1.00] |")
    assert row.endswith("| 50 [25, 100] |")


def test_memory_table_shows_per_stream_and_rss_idle_open_after() -> None:
    phase = {"envoy_rss": 66.0, "envoy_allocated": 7.0, "sidecar_rss": 157.0}
    figures = {
        "streams": 5000,
        "workers": 2,
        "envoy_kib_per_stream": 90.94,
        "envoy_allocated_kib_per_stream": 86.1,
        "sidecar_kib_per_stream": 10.3,
        "mib": {
            "idle": phase,
            "open": {**phase, "envoy_rss": 510.0, "sidecar_rss": 207.0},
            "after": {"envoy_rss": 523.0, "envoy_allocated": 88.0, "sidecar_rss": 210.0},
        },
    }
    header, rule, row = memory_markdown([figures])
    assert header.count("|") == rule.count("|") == row.count("|")
    assert row == (
        "| enforced, 2 workers | 5,000 | 90.9 (86.1) | 10.3 | "
        "66 / 510 / 523 (88) | 157 / 207 / 210 |"
    )
    report = {"kind": "full memory-only", "machine": "2 cores", "time": "t", "rounds": 3}
    text = markdown({**report, "setups": {}, "memory": [figures]})
    assert row in text and "alternating rounds" not in text and "CPU µs" not in text


def test_the_targets_are_ratios_of_this_runs_figures() -> None:
    """Issue 21's targets: enforced against the floor measured in the same run (and the
    CPU figures against their budgets), each with the range the two spreads allow."""
    cell1 = summarise([_round(1.0), _round(1.0), _round(1.0)])  # added p50 2.0 ms
    cell32 = summarise([_round(1.0), _round(2.0), _round(1.5)])  # 37.5% of direct
    flat = {"median": 1.0, "min": 1.0, "max": 1.0}
    rest = {"envoy_extra_cpu_us": flat, "processor_cpu_us": flat}
    floor = {
        "4 messages c=1": {
            "added_p50_ms": {"median": 1.0, "min": 0.8, "max": 1.25},
            "throughput_ratio": flat,
            **rest,
        },
        "4 messages c=32": {
            "added_p50_ms": flat,
            "throughput_ratio": {"median": 0.75, "min": 0.5, "max": 1.0},
            **rest,
        },
    }
    report = {
        "kind": "quick", "machine": "2 cores", "time": "t", "rounds": 3,
        "setups": {"enforced, 1 worker": {"cells": {"json c=1": cell1, "json c=32": cell32}}},
        "floor": floor,
    }  # fmt: skip
    rows = {row["target"].split(",")[0]: row for row in targets(report)}
    latency = rows["added p50 at c=1"]
    assert latency["value"] == {"median": 2.0, "min": 1.6, "max": 2.5} and not latency["met"]
    throughput = rows["throughput at c=32"]
    assert throughput["value"] == {"median": 0.5, "min": 0.25, "max": 1.0}
    assert not throughput["met"]
    assert rows["sidecar CPU per request at c=32"]["value"]["median"] == 1350.0 / 300
    assert rows["Redis CPU per request at c=32"]["value"] == {"median": 2.7, "min": 2.7, "max": 2.7}
    portkey = rows["ahead of Portkey at c=1: its added p50 / ours"]
    assert portkey["value"]["median"] == 1.54 / 2.0 and not portkey["met"]
    report["targets"] = targets(report)
    table = markdown(report)
    assert "| added p50 at c=1, enforced / do-nothing | <= 1.5 | 2.00 [1.60, 2.50] |" in table


def test_paired_rounds_give_the_floor_ratios_round_by_round() -> None:
    """With paired rounds, the two ratios to the floor are medians of per-round ratios (a
    slow spell hits both sides of a round), and they replace the unpaired ones."""
    from bench.bench import paired_cell

    rounds = [
        {"ours": (2.0, 0.30), "floor": (1.0, 0.60)},  # quiet: 2.0x, 0.5
        {"ours": (4.0, 0.20), "floor": (2.0, 0.40)},  # a slow spell hits both: 2.0x, 0.5
        {"ours": (3.0, 0.24), "floor": (1.0, 0.40)},  # 3.0x, 0.6
    ]
    cell = paired_cell(rounds)
    report = {
        "kind": "full", "machine": "2 cores", "time": "t", "rounds": 3,
        "setups": {"enforced, 1 worker": {"cells": {}}},
        "paired": {"c=1": cell, "c=32": cell},
    }  # fmt: skip
    rows = {row["target"].split(",")[0]: row for row in targets(report)}
    assert rows["added p50 at c=1"]["value"] == {"median": 2.0, "min": 2.0, "max": 3.0}
    assert rows["throughput at c=32"]["value"]["median"] == 0.5
    assert rows["ahead of Portkey at c=1: its added p50 / ours"]["value"]["median"] == 1.54 / 3.0
    report["targets"] = targets(report)
    table = markdown(report)
    assert "| each round: both, back to back | 1 | 3.00 [2.00, 4.00] | 1.00 [1.00, 2.00] |" in table
