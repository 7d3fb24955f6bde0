"""Prometheus metrics of the model registry: models loaded, loads (by outcome, with their time) and evictions.

Registered on the app's own ``Metrics.registry``, next to the request and engine metrics of service/metrics.py.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LOAD_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class ModelMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry if registry is not None else CollectorRegistry()
        self.loaded = Gauge("mt_models_loaded", "models loaded now (ONNX sessions held)", registry=r)
        self.loads = Counter(
            "mt_model_loads", "model loads, by outcome (ok / failed)", ["model", "outcome"], registry=r
        )
        self.load_seconds = Histogram(
            "mt_model_load_seconds", "time to load (and warm) a model", ["model"], buckets=LOAD_BUCKETS, registry=r
        )
        self.evictions = Counter(
            "mt_model_evictions", "models unloaded to stay within MT_MAX_LOADED_MODELS", ["model"], registry=r
        )
