"""What the app holds while it runs: settings, metrics, and the registry once the models are loaded and warm."""

from __future__ import annotations

import asyncio
import logging
import time

from service.batcher import Batcher, BatchLimits
from service.engine import Engine
from service.metrics import Metrics
from service.registry import Registry, ServedModel
from service.settings import Settings

logger = logging.getLogger(__name__)


class NotReady(RuntimeError):
    """The models are still loading (or failed to load, or the server is draining): 503."""


class ServiceState:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.registry: Registry | None = None
        self.error: str | None = None
        self.draining = False

    @property
    def ready(self) -> bool:
        return self.registry is not None and not self.draining

    async def load(self) -> None:
        """Load and warm up every model (in worker threads), then start their batchers."""
        s = self.settings
        limits = BatchLimits.from_settings(s)
        started = time.perf_counter()
        try:
            served = []
            for path in s.models:
                engine = await asyncio.to_thread(
                    Engine.load, path, device=s.device, variant=s.variant, threads=s.threads
                )
                if s.warmup:
                    await asyncio.to_thread(engine.warmup)
                served.append(ServedModel(engine, Batcher(engine, limits, self.metrics)))
            registry = Registry(served)
        except Exception as error:  # reported by /health/ready and the log; the process stays up to say so
            self.error = f"{type(error).__name__}: {error}"
            logger.exception("loading models failed")
            return
        for model in served:
            model.batcher.start()
        self.registry = registry
        pairs = ", ".join(f"{m.engine.name} ({m.pair[0]}→{m.pair[1]})" for m in served)
        logger.info("ready in %.1f s: %s", time.perf_counter() - started, pairs)

    async def close(self) -> None:
        """Refuse new work and let every batcher finish what it has queued."""
        self.draining = True
        if self.registry is not None:
            await asyncio.gather(*(m.batcher.close() for m in self.registry.models.values()))
