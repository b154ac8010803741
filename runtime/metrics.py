"""Prometheus metrics that span processes: workers record, the API exports.

Job durations and denoising step times are measured in worker processes, possibly on other
hosts, so they are accumulated as histogram buckets in Redis (or in memory when embedded) and
the API's ``/metrics`` reads them back at scrape time.
"""

from __future__ import annotations

import bisect
import logging
import math
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Protocol

import redis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

logger = logging.getLogger(__name__)

HISTOGRAMS: dict[str, tuple[str, tuple[float, ...]]] = {
    "job_duration_seconds": (
        "Wall time of finished jobs",
        (1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
    ),
    "step_seconds": (
        "Time of one denoising step",
        (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
    ),
    "retrieval_seconds": (
        "Memory bank search latency",
        (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
    ),
}
COUNTERS = {
    "jobs_submitted_total": "Jobs accepted by the API",
    "jobs_finished_total": "Jobs that reached a final status",
    "errors_total": "Failed jobs and API errors",
}


class MetricsSink(Protocol):
    def observe(self, name: str, value: float) -> None: ...

    def increment(self, name: str, label: str = "", amount: float = 1.0) -> None: ...

    def read(self, key: str) -> dict[str, float]: ...


def _bucket_key(name: str, value: float) -> str:
    bounds = HISTOGRAMS[name][1]
    index = bisect.bisect_left(bounds, value)
    return str(bounds[index]) if index < len(bounds) else "+Inf"


class LocalMetrics:
    """In-process sink (embedded mode and tests)."""

    def __init__(self) -> None:
        self._values: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self._lock = threading.Lock()

    def _add(self, key: str, field: str, amount: float) -> None:
        with self._lock:
            self._values[key][field] += amount

    def observe(self, name: str, value: float) -> None:
        self._add(f"h:{name}", _bucket_key(name, value), 1)
        self._add(f"h:{name}", "sum", value)

    def increment(self, name: str, label: str = "", amount: float = 1.0) -> None:
        self._add(f"c:{name}", label, amount)

    def read(self, key: str) -> dict[str, float]:
        with self._lock:
            return dict(self._values.get(key, {}))


class RedisMetrics:
    """Shared sink: one Redis hash per metric, incremented atomically by every process."""

    def __init__(self, client: redis.Redis, prefix: str = "ditmem:metrics") -> None:
        self.redis = client
        self.prefix = prefix
        self._last_warning = -math.inf

    # Metrics never break what they measure: with Redis away, a sample is dropped (and said
    # once in the log), and a scrape shows what it can.

    def observe(self, name: str, value: float) -> None:
        key = f"{self.prefix}:h:{name}"
        try:
            pipe = self.redis.pipeline()
            pipe.hincrbyfloat(key, _bucket_key(name, value), 1)
            pipe.hincrbyfloat(key, "sum", value)
            pipe.execute()
        except redis.RedisError as error:
            self._dropped(error)

    def increment(self, name: str, label: str = "", amount: float = 1.0) -> None:
        try:
            self.redis.hincrbyfloat(f"{self.prefix}:c:{name}", label, amount)
        except redis.RedisError as error:
            self._dropped(error)

    def read(self, key: str) -> dict[str, float]:
        try:
            raw = self.redis.hgetall(f"{self.prefix}:{key}")
        except redis.RedisError as error:
            self._dropped(error)
            return {}
        return {(k.decode() if isinstance(k, bytes) else k): float(v) for k, v in raw.items()}

    def _dropped(self, error: redis.RedisError) -> None:
        now = time.monotonic()
        if now - self._last_warning > 60:
            logger.warning("metrics not recorded while Redis is unreachable: %s", error)
            self._last_warning = now


class _Collector:
    def __init__(self, sink: MetricsSink, gauges: Callable[[], dict[str, dict[str, float]]]):
        self.sink = sink
        self.gauges = gauges

    def collect(self) -> Iterator:
        for name, (help_text, bounds) in HISTOGRAMS.items():
            values = self.sink.read(f"h:{name}")
            cumulative, buckets = 0.0, []
            for bound in (*map(str, bounds), "+Inf"):
                cumulative += values.get(bound, 0.0)
                buckets.append((bound, cumulative))
            yield HistogramMetricFamily(
                f"ditmem_{name}", help_text, buckets=buckets, sum_value=values.get("sum", 0.0)
            )
        for name, help_text in COUNTERS.items():
            family = CounterMetricFamily(f"ditmem_{name}", help_text, labels=["kind"])
            for label, value in self.sink.read(f"c:{name}").items():
                family.add_metric([label], value)
            yield family
        for name, series in self.gauges().items():
            family = GaugeMetricFamily(f"ditmem_{name}", name.replace("_", " "), labels=["queue"])
            for label, value in series.items():
                family.add_metric([label], value)
            yield family


def render(sink: MetricsSink, gauges: Callable[[], dict[str, dict[str, float]]]) -> bytes:
    """The Prometheus text exposition of every metric."""
    registry = CollectorRegistry()
    registry.register(_Collector(sink, gauges))
    return generate_latest(registry)
