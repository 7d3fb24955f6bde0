"""What the app holds while it runs: settings, metrics, and the registry of servable models once it is built."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from pathlib import Path

from model.manifest import read_manifest, resolve_variant
from model.model_dir import read_model_dir
from service.batcher import BatchLimits
from service.engine import Engine, resolve_device
from service.loops import DecodeLoops
from service.metrics import Metrics
from service.model_metrics import ModelMetrics
from service.registry import ModelEntry, ModelUnavailable, Registry, ServedModel
from service.settings import Settings

logger = logging.getLogger(__name__)

MAX_AUTO_LOOPS = 4  # measured on 2 cores only (two loops of one thread); more cores get at most this many


def cpu_cores() -> int:
    """The cores this process may use: its affinity mask (a container's cpuset), capped by a cgroup v2 CPU quota
    (a Kubernetes CPU limit, rounded up)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    with contextlib.suppress(OSError, ValueError):
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    return cores


def decode_plan(settings: Settings, device: str) -> tuple[int, int]:
    """(decode loops, intra-op threads) for a model: MT_DECODE_LOOPS / MT_THREADS, 0 = auto. Auto on CPU: one loop
    per core (at most MAX_AUTO_LOOPS) and the cores shared among them; on CUDA one loop, onnxruntime's threads."""
    loops = settings.decode_loops or (1 if device == "cuda" else min(cpu_cores(), MAX_AUTO_LOOPS))
    threads = settings.threads
    if not threads and device != "cuda" and (settings.decode_loops == 0 or loops > 1):
        threads = max(1, cpu_cores() // loops)
    return loops, threads


class NotReady(RuntimeError):
    """The registry is still being built (or failed to build, or the server is draining): 503."""


class ServiceState:
    """Start-up reads every model's model.json and manifest (no ONNX session), builds the registry, then loads
    the first model; the server is ready once that one is loaded and warm. The next models up to
    MT_MAX_LOADED_MODELS (all of them when it is 0) load in the background after that, the others on first use."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.registry: Registry | None = None
        self.error: str | None = None
        self.draining = False
        self._preloading: asyncio.Task | None = None

    @property
    def ready(self) -> bool:
        return self.registry is not None and not self.draining

    def entry(self, path: Path, device: str) -> ModelEntry:
        """A model known from its model.json and manifest: cheap, no ONNX session and no tokenizer."""
        info = read_model_dir(path)
        try:
            variant = resolve_variant(read_manifest(info.path / "onnx"), self.settings.variant, device)
        except (OSError, ValueError):  # no readable manifest: its load will say so (and how to fix it)
            variant = self.settings.variant
        return ModelEntry(info, variant, device)

    async def open(self, entry: ModelEntry) -> ServedModel:
        """Load a model's sessions and warm them up in worker threads, then start its batcher."""
        s = self.settings
        loops, threads = decode_plan(s, entry.device)
        engine = await asyncio.to_thread(
            Engine.load, entry.info.path, device=s.device, variant=s.variant, threads=threads
        )
        if s.warmup:
            await asyncio.to_thread(engine.warmup)
        logger.info("model %s: %d decode loop(s), intra-op threads %s", engine.name, loops, threads or "default")
        batcher = DecodeLoops(engine, BatchLimits.from_settings(s), self.metrics, loops)
        batcher.start()
        return ServedModel(engine, batcher)

    async def load(self) -> None:
        """Build the registry and load the first model; a failure here is the server's (mt-serve stops)."""
        s = self.settings
        started = time.perf_counter()
        try:
            device = resolve_device(s.device)
            entries = [self.entry(path, device) for path in s.models]
            registry = Registry(entries, self.open, s.max_loaded_models, ModelMetrics(self.metrics.registry))
            await registry.load(entries[0])
        except Exception as error:  # reported by /health/ready and the log; the process stays up to say so
            cause = error.__cause__ if isinstance(error, ModelUnavailable) and error.__cause__ else error
            self.error = f"{type(cause).__name__}: {cause}"
            logger.exception("loading models failed")
            return
        self.registry = registry
        preload = entries[1 : s.max_loaded_models or len(entries)]
        logger.info(
            "ready in %.1f s: %d model%s known (%s), %s loaded; %s",
            time.perf_counter() - started,
            len(entries),
            "" if len(entries) == 1 else "s",
            ", ".join(f"{e.name} ({e.pair[0]}→{e.pair[1]})" for e in entries),
            entries[0].name,
            f"loading {len(preload)} more in the background"
            if preload
            else ("the others load on first use" if len(entries) > 1 else "nothing else to load"),
        )
        if preload:
            self._preloading = asyncio.create_task(self._preload(registry, preload), name="preload-models")

    @staticmethod
    async def _preload(registry: Registry, entries: list[ModelEntry]) -> None:
        """Load ``entries`` one after another while there is room (requests may have taken it meanwhile)."""
        for entry in entries:
            if registry.full:
                return
            with contextlib.suppress(ModelUnavailable):  # logged by the registry; its requests get 503
                await registry.load(entry)

    async def close(self) -> None:
        """Refuse new work and let every batcher finish what it has queued."""
        self.draining = True
        if self._preloading is not None:
            self._preloading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._preloading
        if self.registry is not None:
            await self.registry.close()
