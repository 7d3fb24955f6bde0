"""Continuous batching for one decode loop of a model: sentences from requests join and leave one running decoder
batch (a model runs one or more such loops over its engine: ``service/loops.py``).

Two sides. The engine thread (one per loop) runs the decoder batch step after step without waiting for
anybody (``EngineBatch.step``: newcomers are encoded and joined first); between two steps it applies what the
event loop handed it through a locked inbox: sentences that leave (their request is gone: client left,
timed out, failed; their rows are freed at once) and sentences that join. The event loop queues requests'
sentences, decides departures and admissions, and answers each sentence as soon as the engine reports it
finished; a request is answered when its last sentence is. A sentence's translation does not depend on what
shares its steps (``model/continuous.py``).

Fairness. Admission follows a token budget (``max_batch_tokens``: source tokens x beam of the live
sentences). The next sentence admitted is always one of the request holding the least budget (ties: the
oldest request), so freed rows go to the requests that have least, and a request that holds nothing may
join even when the budget is full (up to twice it): a short request never waits for a long decode to end.
While rows are live, newcomers join together every ``admit_every_steps`` steps (joining costs the step an
encoder call and a copy of the cache), at once when the engine is idle.

Back-pressure and faults: a request with more sentences than ``queue_size`` could never be queued
(``TooManySentences``, 413: split the request); one whose longest possible output exceeds
``max_output_tokens`` is refused before decoding (``TooMuchWork``, 413); one that would push the queue past
``queue_size`` is refused for now (``QueueFull``, 503 + Retry-After). A request not done within
``request_timeout_s`` gets ``RequestTimeout``. When a step raises, the engine loop halts and the live
sentences are decoded again one request at a time (static batches), so only the request the engine fails on
gets ``BatchFailed`` (outright when the failed step held only its sentences) and the others their
translations; the running batch starts afresh.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from model.decoding import DecodingOptions
from service.engine import Engine, EngineBatch, SentenceResult, batch_cost
from service.metrics import Metrics
from service.settings import Settings

logger = logging.getLogger(__name__)

QUEUED, DECODING, DROPPED, DONE = "queued", "decoding", "dropped", "done"


class QueueFull(RuntimeError):
    """The queue has no room for this request now; retry later."""


class TooManySentences(ValueError):
    """The request alone has more sentences than the queue holds; it must be split (413)."""


class TooMuchWork(ValueError):
    """The request could make the engine generate more target tokens than one request may (413)."""


class RequestTimeout(RuntimeError):
    """The request was not decoded within the request timeout."""


class BatchFailed(RuntimeError):
    """The engine raised while decoding this request's sentences."""


ENQUEUE_CHUNK = 1024  # sentences queued between two yields to the event loop
OVERDRAW = 2  # a request holding no rows may join until the live sentences cost this many budgets


@dataclass(eq=False)
class _Request:
    """A request's sentences in the scheduler: those waiting (in order), what its live ones hold, its first step."""

    request_id: str
    waiting: deque[_Item] = field(default_factory=deque)
    held: int = 0  # budget (source tokens x beam) of its sentences in the running batch
    unfinished: int = 0  # its sentences not yet answered or dropped
    failed: bool = False
    arrived: float = field(default_factory=time.monotonic)
    first_step: int | None = None  # the batcher's step count when its first sentence joined


@dataclass(eq=False)
class _Item:
    source: list[int]
    options: DecodingOptions
    future: asyncio.Future
    request: _Request
    cost: int
    enqueued: float = field(default_factory=time.monotonic)
    state: str = QUEUED


@dataclass(frozen=True)
class BatchLimits:
    max_batch_tokens: int = 4096
    max_wait_ms: float = 5.0
    queue_size: int = 2048
    request_timeout_s: float = 60.0
    max_output_tokens: int = 100_000
    admit_every_steps: int = 8

    @classmethod
    def from_settings(cls, settings: Settings) -> BatchLimits:
        s = settings
        return cls(
            s.max_batch_tokens,
            s.max_wait_ms,
            s.queue_size,
            s.request_timeout_s,
            s.max_output_tokens,
            s.admit_every_steps,
        )


class Batcher:
    """Queues sentences of one model and decodes them in one running batch on that model's engine thread."""

    def __init__(
        self, engine: Engine, limits: BatchLimits, metrics: Metrics, loop_id: int = 0, count_requests: bool = True
    ) -> None:
        """``loop_id`` names the engine thread of one of several decode loops (``service.loops``), whose gauges add
        up per model; ``count_requests`` off leaves the in-flight gauge to the caller (a request split over loops
        is one request)."""
        self.engine = engine
        self.limits = limits
        self.metrics = metrics
        self.count_requests = count_requests
        self._gauges: dict[str, float] = {}  # this batcher's share of each per-model gauge
        self._requests: dict[_Request, None] = {}  # requests with unfinished sentences, in arrival order
        self._live: dict[_Item, None] = {}  # sentences in the running batch
        self._held = 0  # budget held by the live sentences
        self._depth = 0  # queued sentences, not yet decoding or dropped
        self._steps = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self._enqueuing = 0  # requests part way through queueing their sentences (close waits for them)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"engine-{engine.name}-{loop_id}")
        # Shared with the engine thread, under _lock: the (departed, joining) hand-overs it has not applied yet,
        # whether its step loop runs, and whether a failed step halted it (until the loop has recovered).
        self._lock = threading.Lock()
        self._inbox: list[tuple[list[_Item], list[_Item]]] = []
        self._running = False
        self._halted = False
        self._batch: EngineBatch | None = None  # the engine thread's (and, once halted, the recovery's)
        self._pump_scheduled = False
        self._last_admission = -(10**9)  # the step count when sentences last joined
        self._idle_timer: asyncio.TimerHandle | None = None
        self._recovering: asyncio.Future | None = None

    @property
    def depth(self) -> int:
        return self._depth

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()

    async def close(self) -> None:
        """Stop taking requests, decode every queued sentence, then stop the engine thread."""
        self._closing = True
        self._pump()
        while self._requests or self._enqueuing or self._running or self._halted:
            await asyncio.sleep(0.01)
        self._executor.shutdown(wait=True)

    async def translate(
        self,
        sources: Sequence[list[int]],
        options: DecodingOptions,
        request_id: str = "-",
        check: Callable[[int, SentenceResult], None] | None = None,
    ) -> list[SentenceResult]:
        """Results for ``sources`` (non-empty token lists), in order; raises TooManySentences, TooMuchWork,
        QueueFull, RequestTimeout, BatchFailed. ``check(index, result)`` sees each sentence's result as soon as
        it finishes; what it raises ends the request at once (its other sentences leave the batch)."""
        if not sources:
            return []
        name = self.engine.name
        if self._closing:
            self.metrics.rejected.labels(name, "shutting_down").inc()
            raise QueueFull("the server is shutting down")
        self.check_size(len(sources))
        self.check_work(sources, options)
        self.check_room(len(sources), self._depth)
        loop = asyncio.get_running_loop()
        request = _Request(request_id)
        items: list[_Item] = []
        self._set_depth(self._depth + len(sources))  # the whole request's room, taken before the first yield
        self._requests[request] = None
        self._enqueuing += 1
        try:
            # In chunks, with the event loop free in between: a big queue is not built in one blocking go.
            for start in range(0, len(sources), ENQUEUE_CHUNK):
                if start:
                    await asyncio.sleep(0)
                for source in sources[start : start + ENQUEUE_CHUNK]:
                    cost = batch_cost(len(source), 1, options.beam_size)
                    item = _Item(list(source), options, loop.create_future(), request, cost)
                    item.future.add_done_callback(lambda _, item=item: self._forget(item))
                    request.waiting.append(item)
                    request.unfinished += 1
                    items.append(item)
                self._kick()
        finally:
            self._enqueuing -= 1
            self._kick()
            if len(items) < len(sources):  # cancelled while queueing: give back the room never used
                self._set_depth(self._depth - (len(sources) - len(items)))
                for item in items:
                    item.future.cancel()
            self._update_in_flight()
        try:
            async with asyncio.timeout(self.limits.request_timeout_s):
                return await self._results(items, check)
        except TimeoutError:
            self.metrics.rejected.labels(name, "timeout").inc()
            raise RequestTimeout(
                f"not translated within MT_REQUEST_TIMEOUT_S={self.limits.request_timeout_s:g} s"
            ) from None
        finally:
            for item in items:  # after a failure or timeout, the request's other sentences are dropped
                item.future.cancel()

    @staticmethod
    async def _results(items: list[_Item], check: Callable[[int, SentenceResult], None] | None) -> list:
        """The items' results in order, taken as they finish (the first exception, or ``check``'s, is raised)."""
        finished: asyncio.Queue[int] = asyncio.Queue()
        for i, item in enumerate(items):
            item.future.add_done_callback(lambda _, i=i: finished.put_nowait(i))
        results: list[SentenceResult | None] = [None] * len(items)
        for _ in items:
            i = await finished.get()
            results[i] = items[i].future.result()  # raises BatchFailed, or CancelledError if we were cancelled
            if check is not None:
                check(i, results[i])
        return results

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

    def check_room(self, n_sentences: int, depth: int) -> None:
        """QueueFull when ``n_sentences`` more would push a queue holding ``depth`` past ``queue_size``."""
        if depth + n_sentences > self.limits.queue_size:
            self.metrics.rejected.labels(self.engine.name, "queue_full").inc()
            raise QueueFull(
                f"the queue holds {depth} sentences and this request adds {n_sentences} "
                f"(MT_QUEUE_SIZE={self.limits.queue_size})"
            )

    def check_work(self, sources: Sequence[Sequence[int]], options: DecodingOptions) -> None:
        """TooMuchWork when the request's longest possible output (each sentence's max output length, capped by
        the model's positions) is over ``max_output_tokens``: known before anything is decoded."""
        limit = self.limits.max_output_tokens
        cap = self.engine.max_positions - 1
        total = int(options.max_lengths([len(s) for s in sources]).clip(max=cap).sum())
        if total > limit:
            self.metrics.rejected.labels(self.engine.name, "too_much_work").inc()
            per = f"max_length {options.max_length}" if options.max_length else "source + 50 tokens"
            raise TooMuchWork(
                f"the request may generate up to {total} target tokens ({per} per sentence), over this server's "
                f"limit of {limit} per request (MT_MAX_OUTPUT_TOKENS): send fewer or shorter texts, or set a "
                "smaller max_length"
            )

    def _forget(self, item: _Item) -> None:
        """A queued sentence whose future was cancelled (timeout, client gone) is dropped from the queue at once;
        a live one leaves the running batch at the next step boundary."""
        if item.state == QUEUED and item.future.cancelled():
            item.state = DROPPED
            self._set_depth(self._depth - 1)
            self.metrics.cancelled.labels(self.engine.name, "queued").inc()
            self._finish(item)
        elif item.state == DECODING:
            self._kick()  # it leaves the running batch at the next step boundary

    def _finish(self, item: _Item) -> None:
        """``item`` is answered or dropped: its request leaves the scheduler with its last sentence."""
        request = item.request
        request.unfinished -= 1
        if request.unfinished == 0:
            self._requests.pop(request, None)
            if request.first_step is not None:
                self.metrics.request_steps.labels(self.engine.name).observe(self._steps - request.first_step)
            self._update_in_flight()

    def _set_depth(self, depth: int) -> None:
        self._depth = depth
        self._gauge("queue_depth", depth)

    def _update_in_flight(self) -> None:
        if self.count_requests:
            self._gauge("in_flight", len(self._requests))

    def _gauge(self, name: str, value: float) -> None:
        """Set this batcher's share of a per-model gauge (several decode loops of a model add up)."""
        getattr(self.metrics, name).labels(self.engine.name).inc(value - self._gauges.get(name, 0))
        self._gauges[name] = value

    def _head(self, request: _Request) -> _Item | None:
        """The request's next waiting sentence (dropped ones are removed on the way)."""
        while request.waiting and (request.waiting[0].state != QUEUED or request.waiting[0].future.done()):
            request.waiting.popleft()  # dropped, or cancelled and about to be (its done-callback has not run yet)
        if request.waiting and request.failed:  # a failed request's other sentences are not decoded
            for item in request.waiting:
                item.state = DROPPED
                self._set_depth(self._depth - 1)
                self.metrics.cancelled.labels(self.engine.name, "queued").inc()
                self._finish(item)
            request.waiting.clear()
        return request.waiting[0] if request.waiting else None

    def _admissions(self) -> list[_Item]:
        """The waiting sentences that join at the next step: from the request holding least budget first, while
        the budget allows (a request holding nothing may overdraw it, up to OVERDRAW budgets)."""
        budget = self.limits.max_batch_tokens
        out: list[_Item] = []
        while True:
            heads = [(r, item) for r in list(self._requests) if (item := self._head(r)) is not None]
            if not heads:
                return out
            request, item = min(heads, key=lambda pair: (pair[0].held, pair[0].arrived))
            fits = self._held + item.cost <= budget
            overdraw = request.held == 0 and self._held + item.cost <= OVERDRAW * budget
            if not (fits or overdraw or not self._live):
                return out
            request.waiting.popleft()
            item.state = DECODING
            request.held += item.cost
            if request.first_step is None:
                request.first_step = self._steps
            self._held += item.cost
            self._live[item] = None
            self._set_depth(self._depth - 1)
            out.append(item)

    def _departures(self) -> list[_Item]:
        """Live sentences whose request is gone (cancelled, timed out, failed): they leave at this boundary."""
        gone = [item for item in self._live if item.future.done() or item.request.failed]
        for item in gone:
            self._leave(item)
            item.state = DROPPED
            self.metrics.cancelled.labels(self.engine.name, "decoding").inc()
            self._finish(item)
        return gone

    def _leave(self, item: _Item) -> None:
        del self._live[item]
        item.request.held -= item.cost
        self._held -= item.cost

    def _oldest_waiting(self) -> float | None:
        """When the longest-waiting queued sentence was queued (None: nothing waits)."""
        heads = [item.enqueued for r in list(self._requests) if (item := self._head(r)) is not None]
        return min(heads, default=None)

    def _kick(self) -> None:
        """Run the scheduler soon (once, however many callbacks ask for it before it runs)."""
        if not self._pump_scheduled and self._loop is not None:
            self._pump_scheduled = True
            self._loop.call_soon(self._pump)

    def _pump(self) -> None:
        """On the event loop: hand departures and admissions to the engine thread, starting its step loop when
        it is not running. The engine never waits for the event loop between steps: what is handed over here
        joins (or leaves) at the next step boundary after it arrives."""
        self._pump_scheduled = False
        if self._halted:  # a failed step is being recovered; the pump runs again after it
            return
        gone = self._departures()
        if not self._live and not self._running and not self._closing:
            oldest = self._oldest_waiting()
            remaining = 0.0 if oldest is None else oldest + self.limits.max_wait_ms / 1000 - time.monotonic()
            if remaining > 0:  # an idle engine: the first sentence waits a moment for others to start with it
                if self._idle_timer is None:
                    self._idle_timer = self._loop.call_later(remaining, self._wake_after_wait)
                return
        joining = []
        # Joining costs a step an encoder call and a copy of the cache to append the newcomers' rows, so while
        # rows are live, newcomers join every few steps together rather than one or two at every step.
        if not self._live or self._steps - self._last_admission >= self.limits.admit_every_steps or self._closing:
            joining = self._admissions()
        if joining:
            self._last_admission = self._steps
            self.metrics.admitted.labels(self.engine.name).inc(len(joining))
        if not gone and not joining:
            return
        with self._lock:
            if self._halted:  # a step failed meanwhile: the recovery takes every live sentence, these included
                return
            self._inbox.append((gone, joining))
            start, self._running = not self._running, True
        if start:
            self._loop.run_in_executor(self._executor, self._engine_loop)

    def _wake_after_wait(self) -> None:
        self._idle_timer = None
        self._pump()

    def _engine_loop(self) -> None:
        """On the engine thread: apply the hand-overs, step, report; until nothing is live or waiting to join."""
        loop = self._loop
        while True:
            with self._lock:
                handed, self._inbox = self._inbox, []
                if not handed and (self._batch is None or self._batch.idle):
                    self._running = False
                    self._batch = None  # nothing live: a fresh batch for whoever comes next
                    loop.call_soon_threadsafe(self._idle)
                    return
            started = time.perf_counter()
            try:
                if self._batch is None:
                    self._batch = self.engine.open_batch()
                batch = self._batch
                for gone, joining in handed:
                    if gone:
                        batch.drop(set(gone))
                    for item in joining:
                        batch.admit(item, item.source, item.options)
                if batch.idle:
                    continue
                retired = batch.step()
            except BaseException as error:  # whatever the engine raised, the step loop stops and the loop recovers
                in_step = set(self._batch.keys()) if self._batch is not None else set()  # sentences it held
                with self._lock:
                    self._inbox, self._running, self._halted, self._batch = [], False, True, None
                loop.call_soon_threadsafe(self._on_failure, error, in_step)
                return
            report = (retired, batch.last_rows, batch.live_rows, time.perf_counter() - started)
            loop.call_soon_threadsafe(self._on_step, *report)

    def _idle(self) -> None:
        self._gauge("live_rows", 0)
        self._gauge("live_sentences", 0)
        self._kick()  # anything that arrived while the engine was stopping

    def _on_step(self, retired: list, rows: int, live_rows: int, seconds: float) -> None:
        """On the event loop: one step was made; its finished sentences answer their requests."""
        name = self.engine.name
        self._steps += 1
        self.metrics.steps.labels(name).inc()
        self.metrics.step_seconds.labels(name).observe(seconds)
        self.metrics.step_rows.labels(name).observe(rows)
        for item, result in retired:
            if item in self._live:  # not departed meanwhile
                self._leave(item)
                self._answer(item, result)
        self._gauge("live_rows", live_rows)
        self._gauge("live_sentences", len(self._live))
        if retired or self._depth:
            self._pump()

    def _on_failure(self, error: BaseException, in_step: set) -> None:
        self.metrics.step_failures.labels(self.engine.name).inc()
        task = asyncio.ensure_future(self._recover(error, in_step))
        self._recovering = task  # keep a reference until it is done

    def _answer(self, item: _Item, result: SentenceResult) -> None:
        name = self.engine.name
        item.state = DONE
        self.metrics.sentences.labels(name).inc()
        if result.candidates:
            self.metrics.generated_tokens.labels(name).inc(len(result.candidates[0].tokens) + 1)
        if not item.future.done():
            item.future.set_result(result)
        self._finish(item)

    async def _recover(self, error: BaseException, in_step: set) -> None:
        """A step raised: the running batch is discarded and its live sentences are decoded again one request at a
        time (static batches), so only the request(s) the engine fails on get BatchFailed. When the failed step
        held one request's sentences only, that request is the culprit and fails without a retry."""
        affected = list(self._live)
        try:
            await self._decode_alone(affected, error, {item.request for item in in_step})
        finally:
            for item in affected:  # never left unanswered, whatever happened above
                if item.state == DECODING:
                    self._fail([item], error)
            with self._lock:
                self._halted = False
            self._pump()

    async def _decode_alone(self, affected: list[_Item], error: BaseException, in_step: set[_Request]) -> None:
        requests: dict[_Request, list[_Item]] = {}
        for item in affected:
            self._leave(item)
            requests.setdefault(item.request, []).append(item)
        ids = ", ".join(sorted(r.request_id for r in in_step))
        logger.error("decoder step over the sentences of requests %s failed: %r", ids, error)
        if len(in_step) == 1:  # the one request in the failed step is the culprit; any others join no step yet
            (culprit,) = in_step
            self._fail(requests.pop(culprit, []), error)
        if requests:
            logger.info("decoding the failed step's other sentences again, one request at a time")
        loop = asyncio.get_running_loop()
        for request, items in requests.items():
            await asyncio.sleep(0)
            pending = [i for i in items if not i.future.done()]  # the client may have gone meanwhile
            for item in items:
                if item.future.done():
                    item.state = DROPPED
                    self._finish(item)
            if not pending:
                continue
            try:
                sources = [i.source for i in pending]
                results = await loop.run_in_executor(
                    self._executor, self.engine.translate_batch, sources, pending[0].options
                )
            except Exception as retry_error:
                self.metrics.step_failures.labels(self.engine.name).inc()
                logger.error("request %s failed alone too: %r", request.request_id, retry_error)
                self._fail(pending, retry_error)
                continue
            for item, result in zip(pending, results, strict=True):
                self._answer(item, result)

    def _fail(self, items: list[_Item], error: Exception) -> None:
        """The engine raised on ``items``: their requests get BatchFailed; their waiting sentences are dropped."""
        for item in items:
            item.request.failed = True
            item.state = DROPPED
            if not item.future.done():
                item.future.set_exception(BatchFailed(f"{type(error).__name__}: {error}"))
            self._finish(item)
