"""Cross-request micro-batching: sentences from every request → length-sorted, token-budget engine batches.

The event loop only queues sentences and resolves futures; one worker thread per model runs the engine.
The collector takes the decoding options of the oldest waiting sentence, waits until that sentence is
``max_wait_ms`` old or its options' queue fills the token budget, then takes every waiting sentence with
those options, sorts them by length and decodes them in budget-sized batches (sentences with different
options never share a batch). Each request awaits its own sentences' futures, so results come back in
input order whatever the batches were.

Back-pressure and faults: a request with more sentences than ``queue_size`` could never be queued
(``TooManySentences``, answered 413: split the request); one that would push the queue past ``queue_size``
is refused for now (``QueueFull``, answered 503 + Retry-After), so an empty queue always accepts a request
that fits. A request not done within ``request_timeout_s`` gets ``RequestTimeout``; a cancelled request
(client gone) has its still-queued sentences dropped. When a batch raises, its sentences are decoded again
in one batch per request, so only the request that makes the engine fail gets ``BatchFailed`` (its other
sentences still queued are dropped, not decoded), and the collector carries on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from model.decoding import DecodingOptions
from service.engine import Engine, SentenceResult, batch_cost, plan_batches
from service.metrics import Metrics
from service.settings import Settings

logger = logging.getLogger(__name__)

QUEUED, DECODING, DROPPED = "queued", "decoding", "dropped"


class QueueFull(RuntimeError):
    """The queue has no room for this request now; retry later."""


class TooManySentences(ValueError):
    """The request alone has more sentences than the queue holds; it must be split (413)."""


class RequestTimeout(RuntimeError):
    """The request was not decoded within the request timeout."""


class BatchFailed(RuntimeError):
    """The engine raised while decoding the batch that held this request's sentences."""


ENQUEUE_CHUNK = 1024  # sentences queued between two yields to the event loop


@dataclass(eq=False)
class _Request:
    """What a request's sentences share: its id (for the log) and whether one of its batches failed."""

    request_id: str
    failed: bool = False


@dataclass(eq=False)
class _Item:
    source: list[int]
    options: DecodingOptions
    future: asyncio.Future
    request: _Request
    enqueued: float = field(default_factory=time.monotonic)
    state: str = QUEUED


@dataclass(frozen=True)
class BatchLimits:
    max_batch_tokens: int = 4096
    max_wait_ms: float = 5.0
    queue_size: int = 2048
    request_timeout_s: float = 60.0

    @classmethod
    def from_settings(cls, settings: Settings) -> BatchLimits:
        s = settings
        return cls(s.max_batch_tokens, s.max_wait_ms, s.queue_size, s.request_timeout_s)


class Batcher:
    """Queues sentences of one model and decodes them on that model's single engine thread."""

    def __init__(self, engine: Engine, limits: BatchLimits, metrics: Metrics) -> None:
        self.engine = engine
        self.limits = limits
        self.metrics = metrics
        self._queues: dict[DecodingOptions, deque[_Item]] = {}
        self._depth = 0  # queued sentences, not yet decoding or dropped
        self._wake = asyncio.Event()
        self._closing = False
        self._enqueuing = 0  # requests part way through queueing their sentences (close waits for them)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"engine-{engine.name}")
        self._task: asyncio.Task | None = None

    @property
    def depth(self) -> int:
        return self._depth

    def start(self) -> None:
        self._task = asyncio.create_task(self._collect(), name=f"batcher-{self.engine.name}")

    async def close(self) -> None:
        """Stop taking requests, decode every queued sentence, then stop the engine thread."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)

    async def translate(
        self, sources: Sequence[list[int]], options: DecodingOptions, request_id: str = "-"
    ) -> list[SentenceResult]:
        """Results for ``sources`` (non-empty token lists), in order; raises TooManySentences, QueueFull,
        RequestTimeout, BatchFailed."""
        if not sources:
            return []
        if self._closing:
            self.metrics.rejected.labels(self.engine.name, "shutting_down").inc()
            raise QueueFull("the server is shutting down")
        self.check_size(len(sources))
        if self._depth + len(sources) > self.limits.queue_size:
            self.metrics.rejected.labels(self.engine.name, "queue_full").inc()
            raise QueueFull(
                f"the queue holds {self._depth} sentences and this request adds {len(sources)} "
                f"(MT_QUEUE_SIZE={self.limits.queue_size})"
            )
        loop = asyncio.get_running_loop()
        request = _Request(request_id)
        items: list[_Item] = []
        self._set_depth(self._depth + len(sources))  # the whole request's room, taken before the first yield
        self._enqueuing += 1
        try:
            # In chunks, with the event loop free in between: a big queue is not built in one blocking go.
            for start in range(0, len(sources), ENQUEUE_CHUNK):
                if start:
                    await asyncio.sleep(0)
                chunk = [
                    _Item(list(s), options, loop.create_future(), request)
                    for s in sources[start : start + ENQUEUE_CHUNK]
                ]
                queue = self._queues.setdefault(options, deque())  # the collector may have taken the last one
                for item in chunk:
                    item.future.add_done_callback(lambda _, item=item: self._forget(item))
                    queue.append(item)
                items += chunk
                self._wake.set()
        finally:
            self._enqueuing -= 1
            self._wake.set()
            if len(items) < len(sources):  # cancelled while queueing: give back the room never used
                self._set_depth(self._depth - (len(sources) - len(items)))
                for item in items:
                    item.future.cancel()
        try:
            return await asyncio.wait_for(asyncio.gather(*(i.future for i in items)), self.limits.request_timeout_s)
        except asyncio.TimeoutError:
            self.metrics.rejected.labels(self.engine.name, "timeout").inc()
            raise RequestTimeout(
                f"not translated within MT_REQUEST_TIMEOUT_S={self.limits.request_timeout_s:g} s"
            ) from None
        finally:
            for item in items:  # after a failure, the request's sentences still queued are dropped
                item.future.cancel()

    def check_size(self, n_sentences: int, at_least: bool = False) -> None:
        """TooManySentences when a request of ``n_sentences`` (``at_least`` that many: still counting) could
        never fit in the queue, however empty."""
        if n_sentences > self.limits.queue_size:
            self.metrics.rejected.labels(self.engine.name, "too_large").inc()
            raise TooManySentences(
                f"the request has {'at least ' if at_least else ''}{n_sentences} sentences but at most "
                f"{self.limits.queue_size} can wait to be "
                f"translated (MT_QUEUE_SIZE={self.limits.queue_size}): split the request into smaller ones"
            )

    def _forget(self, item: _Item) -> None:
        """A queued sentence whose future was cancelled (timeout, client gone) is dropped from the queue."""
        if item.state == QUEUED and item.future.cancelled():
            item.state = DROPPED
            self._set_depth(self._depth - 1)

    def _set_depth(self, depth: int) -> None:
        self._depth = depth
        self.metrics.queue_depth.labels(self.engine.name).set(depth)

    def _oldest(self) -> _Item | None:
        """The longest-waiting queued sentence (dropped ones are removed from the queue heads on the way)."""
        oldest = None
        for options in list(self._queues):
            queue = self._queues[options]
            while queue and queue[0].state != QUEUED:
                queue.popleft()
            if not queue:
                del self._queues[options]
            elif oldest is None or queue[0].enqueued < oldest.enqueued:
                oldest = queue[0]
        return oldest

    def _budget_full(self, options: DecodingOptions) -> bool:
        live = [len(i.source) for i in self._queues.get(options, ()) if i.state == QUEUED]
        if not live:
            return False
        return batch_cost(max(live), len(live), options.beam_size) >= self.limits.max_batch_tokens

    async def _collect(self) -> None:
        while True:
            oldest = self._oldest()
            if oldest is None:
                if self._closing and not self._enqueuing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            deadline = oldest.enqueued + self.limits.max_wait_ms / 1000
            while not self._closing and not self._budget_full(oldest.options):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            items = [i for i in self._queues.pop(oldest.options, ()) if i.state == QUEUED]
            lengths = [len(i.source) for i in items]
            for batch in plan_batches(lengths, oldest.options.beam_size, self.limits.max_batch_tokens):
                # Let the event loop run first: requests failed, timed out or gone since the last batch have
                # their sentences dropped before this one is decoded.
                await asyncio.sleep(0)
                await self._decode([items[i] for i in batch], oldest.options)

    def _drop_dead(self, batch: list[_Item]) -> list[_Item]:
        """The batch's sentences still worth decoding; the others (dropped while waiting, cancelled but not yet
        forgotten, or of a request that already failed) are dropped now."""
        live = []
        for item in batch:
            if item.state != QUEUED:
                continue
            if item.future.done() or item.request.failed:
                item.state = DROPPED
                self._set_depth(self._depth - 1)
                continue
            live.append(item)
        return live

    async def _decode(self, batch: list[_Item], options: DecodingOptions) -> None:
        batch = self._drop_dead(batch)
        if not batch:
            return
        for item in batch:
            item.state = DECODING
        self._set_depth(self._depth - len(batch))
        try:
            await self._run(batch, options)
            return
        except Exception as error:
            failure = error
        requests: dict[_Request, list[_Item]] = {}
        for item in batch:
            requests.setdefault(item.request, []).append(item)
        if len(requests) == 1:
            self._fail(batch, failure)
            return
        # Several requests shared the failed batch: decode each one's sentences alone, so that only the
        # request(s) the engine fails on get an error and the others their translations.
        logger.info("retrying the failed batch as %d batches, one per request", len(requests))
        for group in requests.values():
            await asyncio.sleep(0)
            group = [i for i in group if not i.future.done()]  # the client may have gone meanwhile
            if not group:
                continue
            try:
                await self._run(group, options)
            except Exception as error:
                self._fail(group, error)

    def _fail(self, items: list[_Item], error: Exception) -> None:
        """The engine raised on ``items``: their requests get BatchFailed and their queued sentences are dropped."""
        for item in items:
            item.request.failed = True
            if not item.future.done():
                item.future.set_exception(BatchFailed(f"{type(error).__name__}: {error}"))

    async def _run(self, batch: list[_Item], options: DecodingOptions) -> None:
        """Decode ``batch`` on the engine thread and resolve its futures; an engine error is logged and raised."""
        name = self.engine.name
        started = time.perf_counter()
        try:
            loop = asyncio.get_running_loop()
            sources = [i.source for i in batch]
            results = await loop.run_in_executor(self._executor, self.engine.translate_batch, sources, options)
        except Exception:
            self.metrics.batch_failures.labels(name).inc()
            request_ids = sorted({i.request.request_id for i in batch})
            logger.exception("engine batch of %d sentences failed (requests %s)", len(batch), ", ".join(request_ids))
            raise
        elapsed = time.perf_counter() - started
        tokens = sum(len(r.candidates[0].tokens) + 1 for r in results if r.candidates)
        self.metrics.batches.labels(name).inc()
        self.metrics.batch_size.labels(name).observe(len(batch))
        self.metrics.batch_seconds.labels(name).observe(elapsed)
        self.metrics.sentences.labels(name).inc(len(batch))
        self.metrics.generated_tokens.labels(name).inc(tokens)
        self.metrics.tokens_per_second.labels(name).set(tokens / elapsed if elapsed > 0 else 0.0)
        for item, result in zip(batch, results, strict=True):
            if not item.future.done():
                item.future.set_result(result)
