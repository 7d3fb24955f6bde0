"""Several decode loops for one model: each a :class:`Batcher` (its own running decoder batch on its own thread)
over the model's one engine; requests are spread over them.

Why: on CPU a decoder step is a chain of small ops that parallelise poorly inside (the direct engine with two
intra-op threads runs 1.46x as fast as with one), while the search between calls runs on one core. Two running
batches of one intra-op thread each keep two cores busy instead (onnxruntime sessions run concurrently; each loop
has its own cache). Measured in process on 2 cores, 1,000 test2016 sentences, 32 closed-loop clients, beam 4
(``benchmarks/bench_service.py`` measures the server): one loop of 2 threads 0.77-0.80x the static engine's
throughput, two loops of 1 thread 0.94-0.98x.

A request's sentences are dealt round-robin over the loops, least loaded first (the budget of the unanswered
sentences dealt to each): a one-sentence request goes to the least loaded loop, a long request runs on every loop,
and in each loop the batcher's fairness holds (the request holding least goes first). The request-level checks
(size, work, queue room over all loops) are made once, before anything is queued; a failure or timeout in one
loop cancels the request's sentences in the others.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

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
        ranked = sorted(range(len(self.loops)), key=lambda k: self._dealt[k])
        parts = [list(range(k, len(sources), len(ranked))) for k in range(min(len(ranked), len(sources)))]
        costs = [sum(batch_cost(len(sources[i]), 1, options.beam_size) for i in part) for part in parts]
        for k, cost in zip(ranked, costs, strict=False):
            self._dealt[k] += cost
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
