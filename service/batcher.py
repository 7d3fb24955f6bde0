"""Cross-request micro-batching: sentences from every request → length-sorted, token-budget engine batches.

The event loop only queues sentences and resolves futures; one worker thread per model runs the engine.
The collector takes the decoding options of the oldest waiting sentence, waits until that sentence is
``max_wait_ms`` old or its options' queue fills the token budget, then takes every waiting sentence with
those options, sorts them by length and decodes them in budget-sized batches (sentences with different
options never share a batch). Each request awaits its own sentences' futures, so results come back in
input order whatever the batches were.

Back-pressure and faults: a request that would push the queue past ``queue_size`` sentences is refused
(``QueueFull``, answered 503 + Retry-After); a request not done within ``request_timeout_s`` gets
``RequestTimeout``; a cancelled request (client gone) has its still-queued sentences dropped; an exception
in a batch fails only the requests in that batch (``BatchFailed``), and the collector carries on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from service.engine import DecodeOptions, Engine, SentenceResult, batch_cost, plan_batches
from service.metrics import Metrics

logger = logging.getLogger(__name__)

QUEUED, DECODING, DROPPED = "queued", "decoding", "dropped"


class QueueFull(RuntimeError):
    """The queue has no room for this request now; retry later."""


class RequestTimeout(RuntimeError):
    """The request was not decoded within the request timeout."""


class BatchFailed(RuntimeError):
    """The engine raised while decoding the batch that held this request's sentences."""


@dataclass(eq=False)
class _Item:
    source: list[int]
    options: DecodeOptions
    future: asyncio.Future
    request_id: str
    enqueued: float = field(default_factory=time.monotonic)
    state: str = QUEUED


@dataclass(frozen=True)
class BatchLimits:
    max_batch_tokens: int = 4096
    max_wait_ms: float = 5.0
    queue_size: int = 2048
    request_timeout_s: float = 60.0


class Batcher:
    """Queues sentences of one model and decodes them on that model's single engine thread."""

    def __init__(self, engine: Engine, limits: BatchLimits, metrics: Metrics) -> None:
        self.engine = engine
        self.limits = limits
        self.metrics = metrics
        self._queues: dict[DecodeOptions, deque[_Item]] = {}
        self._depth = 0  # queued sentences, not yet decoding or dropped
        self._wake = asyncio.Event()
        self._closing = False
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
        self, sources: Sequence[list[int]], options: DecodeOptions, request_id: str = "-"
    ) -> list[SentenceResult]:
        """Results for ``sources`` (non-empty token lists), in order; raises QueueFull, RequestTimeout, BatchFailed."""
        if not sources:
            return []
        if self._closing:
            self.metrics.rejected.labels(self.engine.name, "shutting_down").inc()
            raise QueueFull("the server is shutting down")
        if self._depth and self._depth + len(sources) > self.limits.queue_size:
            self.metrics.rejected.labels(self.engine.name, "queue_full").inc()
            raise QueueFull(
                f"the queue holds {self._depth} sentences and this request adds {len(sources)} "
                f"(MT_QUEUE_SIZE={self.limits.queue_size})"
            )
        loop = asyncio.get_running_loop()
        items = [_Item(list(s), options, loop.create_future(), request_id) for s in sources]
        queue = self._queues.setdefault(options, deque())
        for item in items:
            item.future.add_done_callback(lambda _, item=item: self._forget(item))
            queue.append(item)
        self._set_depth(self._depth + len(items))
        self._wake.set()
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

    def _budget_full(self, options: DecodeOptions) -> bool:
        live = [len(i.source) for i in self._queues.get(options, ()) if i.state == QUEUED]
        if not live:
            return False
        return batch_cost(max(live), len(live), options.beam_size) >= self.limits.max_batch_tokens

    async def _collect(self) -> None:
        while True:
            oldest = self._oldest()
            if oldest is None:
                if self._closing:
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
                await self._decode([items[i] for i in batch], oldest.options)

    async def _decode(self, batch: list[_Item], options: DecodeOptions) -> None:
        batch = [i for i in batch if i.state == QUEUED]  # some may have been dropped while waiting
        if not batch:
            return
        for item in batch:
            item.state = DECODING
        self._set_depth(self._depth - len(batch))
        name = self.engine.name
        started = time.perf_counter()
        try:
            loop = asyncio.get_running_loop()
            sources = [i.source for i in batch]
            results = await loop.run_in_executor(self._executor, self.engine.translate_batch, sources, options)
        except Exception as error:  # any engine fault fails this batch only
            self.metrics.batch_failures.labels(name).inc()
            request_ids = sorted({i.request_id for i in batch})
            logger.exception("engine batch of %d sentences failed (requests %s)", len(batch), ", ".join(request_ids))
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(BatchFailed(f"{type(error).__name__}: {error}"))
            return
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
