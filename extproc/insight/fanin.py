"""One scrape per pod: the supervisor serves the sum of its workers' metrics.

With `workers: N` the sidecar is N processes, and each keeps its own counters in memory.
Prometheus scrapes one address per pod (the port its annotation or PodMonitor names), so
the supervisor owns that port and, on each scrape, asks every worker for its metrics over
loopback (each worker serves them on an ephemeral 127.0.0.1 port it announces on stdout)
and answers with one merged exposition:

* counters and histograms (`_total`, `_bucket`, `_count`, `_sum`) are summed over the
  workers, label set by label set: the pod's figure is what one process would have
  counted;
* gauges describe shared state every worker reads from Redis (budget utilization, burn
  rate), so the first worker that reports a series gives its value, never a sum.

Counters must never go down, or `rate()` reads a restart as a reset and over-counts. So the
last figures seen from each worker are kept: a worker that does not answer a scrape
contributes those, and when a worker process is replaced, its last figures move to a
"retired" total that every later scrape adds in. What a worker counted after its last
scrape and before it died is lost from the metrics (never from the ledger, which is the
bill): an undercount of at most one scrape interval of one worker.

We chose this over prometheus_client's multiprocess mode, which needs a shared writable
directory and its own metric classes instead of the OpenTelemetry SDK the workers use.
"""

from __future__ import annotations

import logging
import threading
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

log = logging.getLogger("extproc.insight.fanin")

SCRAPE_TIMEOUT_S = 2.0

Labels = tuple[tuple[str, str], ...]
SampleKey = tuple[str, str, Labels]
"""(family name, sample name, sorted labels)."""


@dataclass(frozen=True, slots=True)
class Family:
    name: str
    kind: str
    documentation: str
    unit: str


def _summed(family: Family, sample_name: str) -> bool:
    """Whether a sample adds up across processes (cumulative), or is one shared value."""
    if family.kind in ("counter", "histogram"):
        return True
    return family.kind == "summary" and sample_name.endswith(("_count", "_sum"))


@dataclass
class Scraped:
    """What one worker reported last: its families (in order) and sample values."""

    families: dict[str, Family] = field(default_factory=dict)
    values: dict[SampleKey, float] = field(default_factory=dict)


def parse(text: str) -> Scraped:
    """A text exposition as families and values; `_created` samples are dropped (a sum of
    creation times means nothing)."""
    out = Scraped()
    for metric in text_string_to_metric_families(text):
        family = Family(metric.name, metric.type, metric.documentation, metric.unit)
        out.families.setdefault(metric.name, family)
        for sample in metric.samples:
            if sample.name.endswith("_created"):
                continue
            key = (metric.name, sample.name, tuple(sorted(sample.labels.items())))
            out.values[key] = float(sample.value)
    return out


def merge(workers: list[Scraped], retired: Scraped) -> list[Metric]:
    """The pod's metrics: cumulative samples summed (retired workers included), gauges
    from the first worker that has them. Families keep the order they were first seen."""
    families: dict[str, Family] = {}
    for scraped in (*workers, retired):
        for name, family in scraped.families.items():
            families.setdefault(name, family)
    values: dict[SampleKey, float] = {}
    for scraped in workers:
        for key, value in scraped.values.items():
            family = families[key[0]]
            if _summed(family, key[1]):
                values[key] = values.get(key, 0.0) + value
            else:
                values.setdefault(key, value)
    for key, value in retired.values.items():
        values[key] = values.get(key, 0.0) + value
    metrics = {n: Metric(f.name, f.documentation, f.kind, f.unit) for n, f in families.items()}
    for (name, sample_name, labels), value in values.items():
        metrics[name].samples.append(Sample(sample_name, dict(labels), value))
    return [m for m in metrics.values() if m.samples]


def retire(retired: Scraped, last: Scraped) -> None:
    """Fold a replaced worker's last cumulative figures into the retired totals."""
    for name, family in last.families.items():
        retired.families.setdefault(name, family)
    for key, value in last.values.items():
        if _summed(last.families[key[0]], key[1]):
            retired.values[key] = retired.values.get(key, 0.0) + value


def fetch(address: str, timeout: float = SCRAPE_TIMEOUT_S) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=timeout) as resp:
        return resp.read().decode("utf-8")  # type: ignore[no-any-return]


class FanIn:
    """The supervisor's view of its workers' metrics; a prometheus_client collector."""

    def __init__(self, fetcher: Callable[[str], str] = fetch) -> None:
        self._fetch = fetcher
        self._lock = threading.Lock()
        self._addresses: dict[int, str] = {}
        self._last: dict[int, Scraped] = {}
        self._retired = Scraped()

    def attach(self, index: int, address: str) -> None:
        """Worker slot `index` is now the process serving metrics at `address`."""
        with self._lock:
            previous = self._last.pop(index, None)
            if previous is not None:
                retire(self._retired, previous)
            self._addresses[index] = address

    def scrape(self) -> list[Metric]:
        with self._lock:
            slots = sorted(self._addresses.items())
        for index, address in slots:
            try:
                scraped = parse(self._fetch(address))
            except (OSError, ValueError) as exc:
                log.warning("metrics of worker %d (%s) unavailable: %s", index, address, exc)
                continue
            with self._lock:
                if self._addresses.get(index) == address:  # not replaced meanwhile
                    self._last[index] = scraped
        with self._lock:
            workers = [self._last[i] for i, _ in slots if i in self._last]
            return merge(workers, self._retired)

    def collect(self) -> Iterator[Metric]:
        yield from self.scrape()


def serve(fanin: FanIn, host: str, port: int) -> Callable[[], None]:
    """The pod's scrape endpoint, `/metrics` on `host:port`; returns its closer."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(fanin)
    server, thread = start_http_server(port, host, registry=registry)
    log.info("prometheus metrics of every worker on http://%s:%d/metrics", host, port)

    def close() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return close
