"""Several decode loops for one model: each a :class:`Batcher` (its own running decoder batch on its own thread)
over the model's one engine; requests are spread over them.

Why: on CPU a decoder step is a chain of small ops that parallelise poorly inside (the direct engine with two
intra-op threads runs 1.46x as fast as with one), while the search between calls runs on one core. Two running
batches of one intra-op thread each keep two cores busy instead (onnxruntime sessions run concurrently; each loop
has its own cache). Measured in process on 2 cores, 1,000 test2016 sentences, 32 closed-loop clients, beam 4
(``benchmarks/bench_service.py`` measures the server): one loop of 2 threads 0.77-0.80x the static engine's
throughput, two loops of 1 thread 0.94-0.98x.

Each loop serves a band of source lengths (:class:`LengthBands`: boundaries that split the recent work evenly), so a
loop's running batch holds sentences of similar length: its cross-attention sources and its self-attention cache (as
long as its oldest row) are padded less. In process, 1,000 test2016 sentences, two loops of 16 clients: the loops'
CPU fell 5-8% (throughput +5-8%) against least-loaded dealing, the loops' mean lengths 13.0 and 21.9. A sentence
goes to its band's loop unless that loop holds more than the least loaded one by over half the loops' mean load
(load = the budget, (source tokens + 1) x beam, of the unanswered sentences dealt to it): requests that overlap
spread over every loop even when their lengths fall in one band, and so does a long request; a lone request at a
time goes to its band's loop. In each loop the batcher's fairness holds (the request holding least goes first). The
request-level checks (size, work, queue room over all loops) are made once, before anything is queued; a failure or
timeout in one loop cancels the request's sentences in the others.
"""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import Callable, Sequence

import numpy as np

from model.decoding import DecodingOptions
from service.batcher import Batcher, BatchLimits
from service.engine import Engine, SentenceResult, batch_cost
from service.metrics import Metrics


class DecodeLoops:
    """``n`` batchers over one engine with a :class:`Batcher`'s interface (``n`` = 1 is a plain batcher)."""

    def __init__(self, engine: Engine, limits: BatchLimits, metrics: Metrics, n: int = 1) -> None:
        if n < 1:
            raise ValueError(f"a model needs at least one decode loop, {n} asked")
        self.engine = engine
        self.limits = limits
        self.metrics = metrics
        self.loops = [Batcher(engine, limits, metrics, k, count_requests=n == 1) for k in range(n)]
        # Budget (source tokens x beam) of the unanswered sentences dealt to each loop, counted when dealt: a loop's
        # own queue sees a request only once its task has run, too late for requests arriving together.
        self._dealt = [0] * n
        self.bands = LengthBands(n)

    @property
    def depth(self) -> int:
        return sum(loop.depth for loop in self.loops)

    def start(self) -> None:
        for loop in self.loops:
            loop.start()

    async def close(self) -> None:
        await asyncio.gather(*(loop.close() for loop in self.loops))

    def check_size(self, n_sentences: int, at_least: bool = False) -> None:
        self.loops[0].check_size(n_sentences, at_least)

    def _deal(self, lengths: list[int], beam_size: int) -> list[list[int]]:
        """The sentence indices each loop gets: its band's (the least loaded of its bands, for a length on
        boundaries), unless that loop is over the least loaded by more than half the mean load (counted in
        ``_dealt`` at once)."""
        shares: list[list[int]] = [[] for _ in self.loops]
        dealt = self._dealt
        for i, length in enumerate(lengths):
            low, high = self.bands.bands(length)
            k = min(range(low, high + 1), key=dealt.__getitem__)
            least = min(range(len(dealt)), key=dealt.__getitem__)
            if dealt[k] - dealt[least] > sum(dealt) / (2 * len(dealt)):
                k = least
            dealt[k] += batch_cost(length, 1, beam_size)
            shares[k].append(i)
        return shares

    async def translate(
        self,
        sources: Sequence[list[int]],
        options: DecodingOptions,
        request_id: str = "-",
        check: Callable[[int, SentenceResult], None] | None = None,
    ) -> list[SentenceResult]:
        """The results of ``sources`` in order, as :meth:`Batcher.translate` (same errors)."""
        if len(self.loops) == 1 or not sources:
            return await self.loops[0].translate(sources, options, request_id, check)
        first = self.loops[0]
        first.check_size(len(sources))
        first.check_work(sources, options)
        first.check_room(len(sources), self.depth)  # over every loop's queue
        lengths = [len(source) for source in sources]
        self.bands.record(lengths, options.beam_size)
        shares = self._deal(lengths, options.beam_size)
        ranked = [k for k, share in enumerate(shares) if share]
        parts = [shares[k] for k in ranked]
        costs = [sum(batch_cost(lengths[i], 1, options.beam_size) for i in part) for part in parts]
        in_flight = self.metrics.in_flight.labels(self.engine.name)
        in_flight.inc()
        tasks = [
            asyncio.ensure_future(
                self.loops[k].translate([sources[i] for i in part], options, request_id, _mapped(check, part))
            )
            for k, part in zip(ranked, parts, strict=False)
        ]
        try:
            done = await asyncio.gather(*tasks)
        finally:
            for task in tasks:  # one loop's failure or timeout ends the request's sentences in the others
                task.cancel()
                task.add_done_callback(_retrieve)  # a second loop's error is not logged as never retrieved
            for k, cost in zip(ranked, costs, strict=False):
                self._dealt[k] -= cost
            in_flight.dec()
        results: list[SentenceResult | None] = [None] * len(sources)
        for part, part_results in zip(parts, done, strict=True):
            for i, result in zip(part, part_results, strict=True):
                results[i] = result
        return results  # type: ignore[return-value]


class LengthBands:
    """Source-length bands, one per loop, whose boundaries split the recent work into equal parts (as nearly as
    whole lengths allow: the work of a length on a boundary falls on both sides; :meth:`bands`).

    Work is counted as the batcher's budget, (length + 1) x beam. Kept over the last ``window`` sentences
    recorded, at most ``per_request`` evenly spaced ones per request (one huge request does not flush what the
    traffic looks like); computed from the first request recorded, then again after every 16 sentences recorded.
    """

    def __init__(self, n: int, window: int = 256, per_request: int = 16) -> None:
        self.n = n
        self.per_request = per_request
        self._lengths = np.zeros(window, dtype=np.int64)
        self._weights = np.zeros(window, dtype=np.int64)
        self._recorded = 0
        self._since = 0
        self.boundaries: list[int] = []  # band k holds lengths in (boundaries[k-1], boundaries[k]], and on them k+1

    def record(self, lengths: Sequence[int], beam_size: int) -> None:
        step = max(1, -(-len(lengths) // self.per_request))
        for length in lengths[::step]:
            slot = self._recorded % len(self._lengths)
            self._lengths[slot], self._weights[slot] = length, batch_cost(length, 1, beam_size)
            self._recorded += 1
            self._since += 1
        if self._since >= 16 or len(self.boundaries) < self.n - 1:
            self._since = 0
            filled = min(self._recorded, len(self._lengths))
            order = np.argsort(self._lengths[:filled], kind="stable")
            cumulative = np.cumsum(self._weights[:filled][order])
            cuts = np.searchsorted(cumulative, cumulative[-1] * np.arange(1, self.n) / self.n)
            self.boundaries = [int(self._lengths[order[min(c, filled - 1)]]) for c in cuts]

    def bands(self, length: int) -> tuple[int, int]:
        """The bands holding ``length``: one, or several when it sits on boundaries (a length carrying the work
        of more than one band, e.g. every sentence as long as the others, is shared among them); before any
        recording, every band."""
        if not self.boundaries:
            return 0, self.n - 1
        return bisect.bisect_left(self.boundaries, length), bisect.bisect_right(self.boundaries, length)


def _retrieve(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()


def _mapped(
    check: Callable[[int, SentenceResult], None] | None, part: list[int]
) -> Callable[[int, SentenceResult], None] | None:
    """``check`` for one loop's share: its index ``i`` is the request's ``part[i]``."""
    if check is None:
        return None
    return lambda i, result: check(part[i], result)
