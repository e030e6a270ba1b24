"""Prometheus metrics, in a registry per app so that several apps (tests) never collide."""
from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("vqtok_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("vqtok_request_latency_seconds", "HTTP request latency",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("vqtok_queue_time_seconds", "time a request waits for its batch",
                                    ["op", "model"], buckets=LATENCY_BUCKETS, registry=r)
        self.inference_time = Histogram("vqtok_inference_time_seconds", "time to run one batch",
                                        ["op", "model"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("vqtok_batch_size", "items per batch", ["op", "model"], buckets=BATCH_BUCKETS,
                                    registry=r)
        self.queue_depth = Gauge("vqtok_queue_depth", "items waiting in a batcher's queue", ["op", "model"],
                                 registry=r)
        self.batch_failures = Counter("vqtok_batch_failures", "batches whose inference raised", ["op", "model"],
                                      registry=r)
        self._warmups: SizeWarmups | None = None
        self._series: set[tuple[str, str]] = set()  # (op, model) label pairs of the batch metrics
        self.mirrored = False  # a workers-layout front end shows the engine process's batch metrics instead
        self.pixels_in_flight = Gauge("vqtok_pixels_in_flight", "pixels admitted requests hold (decoding, "
                                      "queued, running, answering)", registry=r)

    def watch_backend(self, backend: object, model: str = "") -> None:
        """Export the backend's warm-ups of new input sizes (fit=none sizes on CUDA), if it counts them."""
        if not hasattr(backend, "size_warmups"):
            return
        if self._warmups is None:
            self._warmups = SizeWarmups()
            self.registry.register(self._warmups)
        self._warmups.backends[model] = backend

    def unwatch_backend(self, model: str) -> None:
        if self._warmups is not None:
            self._warmups.backends.pop(model, None)

    def for_op(self, op: str, model: str) -> OpMetrics:
        """One operation's metrics for one loaded version (``model`` is its ``name@id``)."""
        labels = (op, model)
        self._series.add(labels)
        return OpMetrics(self.queue_time.labels(*labels), self.inference_time.labels(*labels),
                         self.batch_size.labels(*labels), self.queue_depth.labels(*labels),
                         self.batch_failures.labels(*labels))

    def forget(self, model: str) -> None:
        """Drop an unloaded version's series (those ``for_op`` made for it)."""
        for labels in [lb for lb in self._series if lb[1] == model]:
            for metric in (self.queue_time, self.inference_time, self.batch_size, self.queue_depth,
                           self.batch_failures):
                metric.remove(*labels)
            self._series.discard(labels)


@dataclass(frozen=True)
class OpMetrics:
    """One operation's labelled metrics, looked up once: ``labels()`` costs more than an observation."""

    queue_time: Histogram
    inference_time: Histogram
    batch_size: Histogram
    queue_depth: Gauge
    batch_failures: Counter


class SizeWarmups(Collector):
    """Read at scrape time from the backend's counters (the runtime layer knows nothing of Prometheus)."""

    def __init__(self) -> None:
        self.backends: dict[str, object] = {}  # loaded version ("name@id") -> its backend

    def collect(self):
        count = CounterMetricFamily("vqtok_size_warmups", "input sizes seen for the first time, each warmed "
                                    "at every batch bucket by the request that brought it", labels=["op", "model"])
        seconds = CounterMetricFamily("vqtok_size_warmup_seconds", "time those warm-ups took",
                                      labels=["op", "model"])
        for model, backend in list(self.backends.items()):
            for op in ("encode", "decode"):
                count.add_metric([op, model], backend.size_warmups[op])
                seconds.add_metric([op, model], backend.size_warmup_seconds[op])
        yield count
        yield seconds
