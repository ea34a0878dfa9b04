"""One scrape per pod: counters and histograms summed over workers, gauges taken once,
counters never going down when a worker is replaced or misses a scrape."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from extproc.devstack.stack import free_port
from extproc.insight import fanin
from extproc.insight.telemetry import Telemetry
from tests.unit.insight.test_telemetry import observed, record

WORKER_A = """\
# HELP extproc_tokens_total Tokens billed.
# TYPE extproc_tokens_total counter
extproc_tokens_total{kind="input",workspace="dev"} 100.0
extproc_tokens_total{kind="output",workspace="dev"} 10.0
# HELP extproc_request_duration_seconds Time.
# TYPE extproc_request_duration_seconds histogram
extproc_request_duration_seconds_bucket{endpoint="responses",le="1.0"} 2.0
extproc_request_duration_seconds_bucket{endpoint="responses",le="+Inf"} 3.0
extproc_request_duration_seconds_count{endpoint="responses"} 3.0
extproc_request_duration_seconds_sum{endpoint="responses"} 4.5
# HELP extproc_budget_utilization_ratio Share.
# TYPE extproc_budget_utilization_ratio gauge
extproc_budget_utilization_ratio{scope="ws",workspace="dev"} 0.25
"""

WORKER_B = """\
# HELP extproc_tokens_total Tokens billed.
# TYPE extproc_tokens_total counter
extproc_tokens_total{kind="input",workspace="dev"} 50.0
extproc_tokens_total{kind="input",workspace="ci"} 7.0
# HELP extproc_request_duration_seconds Time.
# TYPE extproc_request_duration_seconds histogram
extproc_request_duration_seconds_bucket{endpoint="responses",le="1.0"} 1.0
extproc_request_duration_seconds_bucket{endpoint="responses",le="+Inf"} 1.0
extproc_request_duration_seconds_count{endpoint="responses"} 1.0
extproc_request_duration_seconds_sum{endpoint="responses"} 0.5
# HELP extproc_budget_utilization_ratio Share.
# TYPE extproc_budget_utilization_ratio gauge
extproc_budget_utilization_ratio{scope="ws",workspace="dev"} 0.26
"""


def samples(metrics: list[object]) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The merged exposition, rendered and parsed back as a Prometheus server would."""
    registry = CollectorRegistry(auto_describe=False)

    class Fixed:
        def collect(self) -> Iterator[object]:
            yield from metrics

    registry.register(Fixed())  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def key(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return name, frozenset(labels.items())


def test_counters_and_histograms_add_up_and_gauges_are_taken_once() -> None:
    got = samples(fanin.merge([fanin.parse(WORKER_A), fanin.parse(WORKER_B)], fanin.Scraped()))
    assert got[key("extproc_tokens_total", kind="input", workspace="dev")] == 150
    assert got[key("extproc_tokens_total", kind="output", workspace="dev")] == 10
    assert got[key("extproc_tokens_total", kind="input", workspace="ci")] == 7
    bucket = "extproc_request_duration_seconds_bucket"
    assert got[key(bucket, endpoint="responses", le="1.0")] == 3
    assert got[key(bucket, endpoint="responses", le="+Inf")] == 4
    assert got[key("extproc_request_duration_seconds_count", endpoint="responses")] == 4
    assert got[key("extproc_request_duration_seconds_sum", endpoint="responses")] == 5
    # Shared state read from Redis by every worker: the first worker's, not 0.51.
    assert got[key("extproc_budget_utilization_ratio", scope="ws", workspace="dev")] == 0.25


class Workers:
    """Canned expositions by address, changed by the test between scrapes."""

    def __init__(self) -> None:
        self.text: dict[str, str] = {}

    def __call__(self, address: str) -> str:
        if address not in self.text:
            raise ConnectionRefusedError(f"nobody at {address}")
        return self.text[address]


def tokens(f: fanin.FanIn) -> float:
    return samples(f.scrape())[key("extproc_tokens_total", kind="input", workspace="dev")]


def test_a_replaced_or_silent_worker_never_makes_a_counter_go_down() -> None:
    workers = Workers()
    f = fanin.FanIn(workers)
    workers.text = {"a:1": WORKER_A, "b:1": WORKER_B}
    f.attach(0, "a:1")
    f.attach(1, "b:1")
    assert tokens(f) == 150
    # Worker 1 stops answering: its last figures stand in.
    del workers.text["b:1"]
    assert tokens(f) == 150
    # Worker 1 is replaced by a fresh process that has counted 5 so far.
    fresh = WORKER_B.replace(
        'extproc_tokens_total{kind="input",workspace="dev"} 50.0',
        'extproc_tokens_total{kind="input",workspace="dev"} 5.0',
    )
    workers.text["b:2"] = fresh
    f.attach(1, "b:2")
    assert tokens(f) == 100 + 50 + 5
    # Replaced twice between scrapes: the one never scraped adds nothing, and what was
    # seen of the others stays.
    workers.text["b:4"] = WORKER_B.replace("50.0", "1.0")
    f.attach(1, "b:3")
    f.attach(1, "b:4")
    assert tokens(f) == 100 + 50 + 5 + 1
    got = samples(f.scrape())
    # Gauges of retired workers are not carried: only live workers describe the present.
    assert got[key("extproc_budget_utilization_ratio", scope="ws", workspace="dev")] == 0.25


@pytest.fixture
def two_workers() -> Iterator[list[Telemetry]]:
    """Two real Telemetry instances with their own scrape endpoints, as two workers have."""
    made = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EXTPROC_WORKER_METRICS", "1")
        mp.delenv("EXTPROC_TELEMETRY", raising=False)
        mp.delenv("OTEL_SDK_DISABLED", raising=False)
        for _ in range(2):
            made.append(Telemetry.from_env())
    yield made
    for t in made:
        t.shutdown()


def test_the_supervisor_endpoint_serves_the_sum_of_real_workers(
    two_workers: list[Telemetry],
) -> None:
    a, b = two_workers
    assert a.metrics_address.startswith("127.0.0.1:") and a.metrics_address != b.metrics_address
    a.observe(observed())
    b.observe(observed())
    b.observe(observed(record(workspace="ci")))
    a.budget_utilization("dev", "ws", 0.5)
    b.budget_utilization("dev", "ws", 0.5)
    f = fanin.FanIn()
    f.attach(0, a.metrics_address)
    f.attach(1, b.metrics_address)
    port = free_port()
    close = fanin.serve(f, "127.0.0.1", port)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    finally:
        close()
    got = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    dev = {
        "workspace": "dev",
        "service": "cli",
        "model": "gpt-4o-mini-2024-07-18",
        "provisional": "false",
    }
    assert got[key("extproc_tokens_total", **dev, kind="input")] == 2 * 1200
    assert got[key("extproc_tokens_total", **{**dev, "workspace": "ci"}, kind="input")] == 1200
    assert got[key("extproc_request_duration_seconds_count", endpoint="chat.completions")] == 3
    assert got[key("extproc_budget_utilization_ratio", scope="ws", workspace="dev")] == 0.5
    genai = {
        "gen_ai_operation_name": "chat",
        "gen_ai_provider_name": "openai",
        "gen_ai_request_model": "gpt-4o-mini",
        "gen_ai_response_model": "gpt-4o-mini-2024-07-18",
    }
    assert got[key("gen_ai_client_operation_duration_seconds_count", **genai)] == 3
    usage = "gen_ai_client_token_usage_sum"
    assert got[key(usage, **genai, gen_ai_token_type="input")] == 3 * 1200
    assert got[key(usage, **genai, gen_ai_token_type="output")] == 3 * 300
