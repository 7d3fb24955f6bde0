"""Prometheus metrics of one app: requests, latency, engine batches, queue depth and decoding throughput.

Each app gets its own registry (no process-global state), so several apps can live in one test process.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("mt_requests", "HTTP requests answered", ["method", "route", "status"], registry=r)
        self.latency = Histogram(
            "mt_request_latency_seconds", "HTTP request latency", ["route"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.sentences = Counter("mt_sentences", "sentences translated", ["model"], registry=r)
        self.batches = Counter("mt_engine_batches", "engine batches decoded", ["model"], registry=r)
        self.batch_failures = Counter("mt_engine_batch_failures", "engine batches that raised", ["model"], registry=r)
        self.batch_size = Histogram(
            "mt_engine_batch_size", "sentences per engine batch", ["model"], buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_seconds = Histogram(
            "mt_engine_batch_seconds", "time to decode one engine batch", ["model"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("mt_queue_depth", "sentences waiting for an engine batch", ["model"], registry=r)
        self.generated_tokens = Counter(
            "mt_generated_tokens", "target tokens generated (best hypotheses)", ["model"], registry=r
        )
        self.tokens_per_second = Gauge(
            "mt_tokens_per_second", "generated tokens per second of the last engine batch", ["model"], registry=r
        )
        self.rejected = Counter(
            "mt_rejected", "requests the queue refused (503; 413 for too_large)", ["model", "reason"], registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
