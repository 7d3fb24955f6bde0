"""Prometheus metrics of one app: requests, latency, the running decoder batch (steps, rows, admitted, retired,
cancelled sentences), queue depth and in-flight requests.

Each app gets its own registry (no process-global state), so several apps can live in one test process.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
STEPS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("mt_requests", "HTTP requests answered", ["method", "route", "status"], registry=r)
        self.latency = Histogram(
            "mt_request_latency_seconds", "HTTP request latency", ["route"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.sentences = Counter(
            "mt_sentences", "sentences translated (retired from the decoder batch)", ["model"], registry=r
        )
        self.admitted = Counter(
            "mt_admitted_sentences", "sentences that joined the decoder batch", ["model"], registry=r
        )
        self.cancelled = Counter(
            "mt_cancelled_sentences",
            "sentences dropped before they finished (client gone, timeout, failed request)",
            ["model", "stage"],
            registry=r,
        )
        self.steps = Counter("mt_engine_steps", "decoder calls of the running batch", ["model"], registry=r)
        self.step_failures = Counter(
            "mt_engine_step_failures", "decoder calls (or per-request retries) that raised", ["model"], registry=r
        )
        self.step_rows = Histogram(
            "mt_engine_step_rows", "rows (beams) per decoder call", ["model"], buckets=ROW_BUCKETS, registry=r
        )
        self.step_seconds = Histogram(
            "mt_engine_step_seconds", "time of one decoder call", ["model"], buckets=STEP_BUCKETS, registry=r
        )
        self.live_rows = Gauge("mt_live_rows", "rows (beams) in the running decoder batch", ["model"], registry=r)
        self.live_sentences = Gauge(
            "mt_live_sentences", "sentences in the running decoder batch", ["model"], registry=r
        )
        self.in_flight = Gauge(
            "mt_in_flight_requests", "requests with sentences waiting or decoding", ["model"], registry=r
        )
        self.request_steps = Histogram(
            "mt_request_steps",
            "decoder calls from a request's first admitted sentence to its last retired one",
            ["model"],
            buckets=STEPS_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("mt_queue_depth", "sentences waiting to join the decoder batch", ["model"], registry=r)
        self.generated_tokens = Counter(
            "mt_generated_tokens", "target tokens generated (best hypotheses)", ["model"], registry=r
        )
        self.rejected = Counter(
            "mt_rejected", "requests the queue refused (503; 413 for too_large)", ["model", "reason"], registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
