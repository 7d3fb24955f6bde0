"""Servable models by language pair: resolves a request's source/target, loads models on first use and keeps
at most MT_MAX_LOADED_MODELS loaded, evicting the least recently used one that no request holds.

Language codes are BCP-47 tags, compared after normalisation by ``langcodes`` ("DE", "de_DE", "deu" and
"ger" all read as "de"): a tag matches a model's language when both normalise to the same tag, or when
their language subtags are equal and one of them names no region or script ("de-DE" asks a "de" model,
"de" asks a "de-CH" one; "de-AT" does not ask a "de-CH" one).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import langcodes

from model.model_dir import ModelInfo
from service.engine import Engine
from service.loops import DecodeLoops
from service.model_metrics import ModelMetrics

logger = logging.getLogger(__name__)

RETRY_FAILED_S = 30.0  # a model that failed to load is not tried again for this long (its requests get 503)


class UnknownPair(LookupError):
    """No servable model translates the requested pair (404)."""


class AmbiguousPair(ValueError):
    """Several models fit; the request must say which (422)."""


class ModelUnavailable(RuntimeError):
    """The model cannot be loaded now: it failed to load, or every loaded model is busy (503 + Retry-After)."""


def normalize(tag: str) -> str:
    """A language tag in its standard form ("DE" -> "de", "de_de" -> "de-DE", "deu" -> "de"); a tag that is
    not BCP-47 at all comes back stripped and lower-cased, so that it can still match a model's own code."""
    try:
        return langcodes.standardize_tag(tag.strip())
    except (ValueError, langcodes.tag_parser.LanguageTagError):
        return tag.strip().lower()


def _language(tag: str) -> str:
    return tag.split("-", 1)[0].lower()


def matches(asked: str | None, served: str) -> bool:
    """Whether a requested tag (None: any) asks for a model language ``served``."""
    if asked is None:
        return True
    asked, served = normalize(asked), normalize(served)
    if asked.lower() == served.lower():
        return True
    return _language(asked) == _language(served) and (asked.count("-") == 0 or served.count("-") == 0)


@dataclass
class ServedModel:
    """A loaded model: its engine and the batcher that feeds it."""

    engine: Engine
    batcher: DecodeLoops

    @property
    def pair(self) -> tuple[str, str]:
        return self.engine.info.source_lang, self.engine.info.target_lang


@dataclass(eq=False)
class ModelEntry:
    """One servable model: known from its model.json at start-up, loaded on first use, unloaded when evicted."""

    info: ModelInfo
    variant: str  # the ONNX variant it loads (resolved from its manifest)
    device: str
    served: ServedModel | None = None
    loading: asyncio.Future[ServedModel] | None = None  # the one load that concurrent first requests share
    in_flight: int = 0  # requests holding the model (between Registry.use's enter and exit)
    last_used: int = 0  # Registry's use clock when a request last took it (0: never)
    failed_at: float | None = None  # monotonic time of the last failed load

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def pair(self) -> tuple[str, str]:
        return self.info.source_lang, self.info.target_lang

    @property
    def status(self) -> str:
        if self.served is not None:
            return "loaded"
        if self.loading is not None:
            return "loading"
        return "failed" if self.failed_at is not None else "unloaded"


Opener = Callable[[ModelEntry], Awaitable[ServedModel]]  # loads a model (off the event loop) and starts its batcher


def describe(pairs: list[tuple[str, str]]) -> str:
    return ", ".join(f"{s}→{t}" for s, t in pairs)


class Registry:
    """Every servable model by language pair; loads them on first use and keeps at most ``max_loaded`` loaded
    (0: no limit), evicting the least recently used one that no request holds.

    All bookkeeping runs on the event loop, so no lock is needed: the checks and the changes they lead to are
    never separated by an ``await``."""

    def __init__(
        self,
        entries: list[ModelEntry],
        opener: Opener,
        max_loaded: int = 0,
        metrics: ModelMetrics | None = None,
        retry_failed_s: float = RETRY_FAILED_S,
    ) -> None:
        self.models: dict[tuple[str, str], ModelEntry] = {}
        for entry in entries:
            if entry.pair in self.models:
                other = self.models[entry.pair].info.path
                raise ValueError(f"{entry.info.path} and {other} both translate {describe([entry.pair])}")
            self.models[entry.pair] = entry
        self.opener = opener
        self.max_loaded = max_loaded
        self.metrics = metrics or ModelMetrics()
        self.retry_failed_s = retry_failed_s
        self.closed = False
        self._clock = itertools.count(1)

    @property
    def pairs(self) -> list[tuple[str, str]]:
        return list(self.models)

    @property
    def sources(self) -> list[str]:
        """The source languages served, each once, in the order the models were given."""
        return list(dict.fromkeys(s for s, _ in self.models))

    @property
    def loaded(self) -> list[ModelEntry]:
        return [e for e in self.models.values() if e.served is not None]

    @property
    def full(self) -> bool:
        """Whether loading one more model needs an eviction first (loads in progress hold their place)."""
        held = sum(e.served is not None or e.loading is not None for e in self.models.values())
        return 0 < self.max_loaded <= held

    def resolve(self, source: str | None, target: str | None) -> ModelEntry:
        fits = [m for (s, t), m in self.models.items() if matches(source, s) and matches(target, t)]
        exact = [m for m in fits if _same(source, m.pair[0]) and _same(target, m.pair[1])]
        if len(exact) == 1:  # "de-CH" when both a "de" and a "de-CH" model are served
            return exact[0]
        if len(fits) == 1:
            return fits[0]
        asked = f"{source or '?'}→{target or '?'}"
        if not fits:
            raise UnknownPair(f"no model translates {asked}; available pairs: {describe(self.pairs)}")
        raise AmbiguousPair(
            f"several models fit {asked}; give both source and target (available pairs: {describe(self.pairs)})"
        )

    @contextlib.asynccontextmanager
    async def use(self, entry: ModelEntry) -> AsyncIterator[ServedModel]:
        """The model, loaded if need be, held for the request: a model in use is never evicted."""
        entry.in_flight += 1
        try:
            served = await self.load(entry)
            entry.last_used = next(self._clock)
            yield served
        finally:
            entry.in_flight -= 1

    async def load(self, entry: ModelEntry) -> ServedModel:
        """The loaded model; the first caller starts the load (evicting first if the registry is full) and
        every concurrent caller awaits that same load. Raises ModelUnavailable when it cannot be loaded."""
        if entry.served is not None:
            return entry.served
        if entry.loading is None:
            if self.closed:
                raise ModelUnavailable("the server is shutting down; retry on another instance")
            if entry.failed_at is not None and time.monotonic() - entry.failed_at < self.retry_failed_s:
                raise ModelUnavailable(_failed_message(entry, self.retry_failed_s))
            victims = self._make_room(entry)
            entry.loading = asyncio.ensure_future(self._load(entry, victims))
            # A load whose callers all went away (client disconnects) still ends; its error is logged there.
            entry.loading.add_done_callback(lambda task: task.cancelled() or task.exception())
        return await asyncio.shield(entry.loading)

    def _make_room(self, entry: ModelEntry) -> list[ServedModel]:
        """Unregister the least recently used idle models until ``entry`` fits; their batchers are closed by
        ``_load``. Raises ModelUnavailable when every loaded model has a request in flight."""
        victims = []
        while self.full:
            idle = [e for e in self.loaded if e.in_flight == 0]
            if not idle:
                raise ModelUnavailable(
                    f"model {entry.name} is not loaded and all {self.max_loaded} loaded models are busy "
                    "(MT_MAX_LOADED_MODELS); retry shortly, or raise MT_MAX_LOADED_MODELS on the server"
                )
            victim = min(idle, key=lambda e: e.last_used)
            assert victim.served is not None
            victims.append(victim.served)
            victim.served = None
            self.metrics.evictions.labels(victim.name).inc()
            self.metrics.loaded.set(len(self.loaded))
            logger.info(
                "evicting model %s (%s), the least recently used, to load %s (MT_MAX_LOADED_MODELS=%d)",
                victim.name,
                describe([victim.pair]),
                entry.name,
                self.max_loaded,
            )
        return victims

    async def _load(self, entry: ModelEntry, victims: list[ServedModel]) -> ServedModel:
        for victim in victims:  # drained (nothing is queued: no request held it) before the new one takes memory
            await victim.batcher.close()
        started = time.perf_counter()
        try:
            served = await self.opener(entry)
        except Exception as error:  # any failure: this model answers 503, the others keep serving
            entry.failed_at = time.monotonic()
            self.metrics.loads.labels(entry.name, "failed").inc()
            logger.exception(
                "model %s (%s) failed to load from %s", entry.name, describe([entry.pair]), entry.info.path
            )
            raise ModelUnavailable(_failed_message(entry, self.retry_failed_s)) from error
        finally:
            entry.loading = None
        elapsed = time.perf_counter() - started
        entry.served, entry.failed_at = served, None
        self.metrics.loads.labels(entry.name, "ok").inc()
        self.metrics.load_seconds.labels(entry.name).observe(elapsed)
        self.metrics.loaded.set(len(self.loaded))
        logger.info("model %s (%s) loaded in %.2f s", entry.name, describe([entry.pair]), elapsed)
        if self.closed:  # shut down while loading: nothing will use it
            await served.batcher.close()
        return served

    async def close(self) -> None:
        """Refuse new loads, let loads in progress end, and drain every loaded model's batcher."""
        self.closed = True
        loading = [e.loading for e in self.models.values() if e.loading is not None]
        await asyncio.gather(*loading, return_exceptions=True)
        await asyncio.gather(*(e.served.batcher.close() for e in self.loaded if e.served is not None))


def _failed_message(entry: ModelEntry, retry_s: float) -> str:
    # The cause names server files: it goes to the log, and clients learn where to look.
    return (
        f"model {entry.name} ({describe([entry.pair])}) failed to load (the server log says why: its directory "
        f"needs fixing or re-exporting); the server tries again {retry_s:g} s after a failure"
    )


def _same(asked: str | None, served: str) -> bool:
    return asked is None or normalize(asked).lower() == normalize(served).lower()
