"""The micro-batcher with a stand-in engine: queue limits, per-request fault isolation, dropped work."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest

from model.decoding import DecodingOptions
from service import batcher as batcher_module
from service.batcher import Batcher, BatchFailed, BatchLimits, QueueFull, TooManySentences
from service.engine import Candidate, SentenceResult
from service.metrics import Metrics

BAD = 99  # a token the stand-in engine fails on


class FakeEngine:
    """Echoes each source as its translation; raises on a batch holding BAD; waits while ``hold`` is clear."""

    name = "fake"

    def __init__(self) -> None:
        self.calls: list[list[list[int]]] = []
        self.hold = threading.Event()
        self.hold.set()

    def translate_batch(self, sources: Sequence[Sequence[int]], options: DecodingOptions) -> list[SentenceResult]:
        self.hold.wait(10)
        self.calls.append([list(s) for s in sources])
        if any(BAD in s for s in sources):
            raise RuntimeError("injected fault")
        return [SentenceResult([Candidate(" ".join(map(str, s)), list(s), 0.0)]) for s in sources]


def run(coroutine_fn, engine: FakeEngine, **limits):
    """Run ``coroutine_fn(batcher)`` with a started batcher over ``engine``, closing it afterwards."""

    async def main():
        batcher = Batcher(engine, BatchLimits(**limits), Metrics())
        batcher.start()
        try:
            return await coroutine_fn(batcher)
        finally:
            engine.hold.set()
            await batcher.close()

    return asyncio.run(main())


def texts(results: list[SentenceResult]) -> list[str]:
    return [r.candidates[0].text for r in results]


def test_a_request_larger_than_the_queue_is_refused_but_one_that_fits_an_empty_queue_is_not() -> None:
    async def go(batcher: Batcher):
        with pytest.raises(TooManySentences, match=r"5 sentences.*MT_QUEUE_SIZE=4.*split the request"):
            await batcher.translate([[1]] * 5, DecodingOptions())
        return await batcher.translate([[1], [2], [3], [4]], DecodingOptions())

    assert texts(run(go, FakeEngine(), queue_size=4)) == ["1", "2", "3", "4"]


def test_a_request_that_would_overfill_the_queue_gets_queue_full() -> None:
    engine = FakeEngine()

    async def go(batcher: Batcher):
        engine.hold.clear()
        busy = asyncio.ensure_future(batcher.translate([[1]], DecodingOptions()))  # holds the engine
        while not engine.calls and batcher.depth:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        waiting = asyncio.ensure_future(batcher.translate([[2], [3]], DecodingOptions()))
        await asyncio.sleep(0.01)
        assert batcher.depth == 2
        with pytest.raises(QueueFull, match="MT_QUEUE_SIZE=3"):
            await batcher.translate([[4], [5]], DecodingOptions())
        engine.hold.set()
        return await busy, await waiting

    busy, waiting = run(go, engine, queue_size=3, max_wait_ms=0)
    assert texts(busy) == ["1"] and texts(waiting) == ["2", "3"]


def test_a_big_request_is_queued_in_chunks_and_answered_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batcher_module, "ENQUEUE_CHUNK", 7)
    sources = [[i % 50 + 1] * (i % 5 + 1) for i in range(100)]
    ticks = 0

    async def go(batcher: Batcher):
        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.ensure_future(ticker())
        await asyncio.sleep(0)
        try:
            return await batcher.translate(sources, DecodingOptions())
        finally:
            task.cancel()

    results = run(go, FakeEngine(), queue_size=100, max_batch_tokens=64)
    assert texts(results) == [" ".join(map(str, s)) for s in sources]
    assert ticks >= 100 // 7  # the event loop ran between chunks


def test_a_failing_batch_is_retried_per_request_so_only_the_culprit_fails() -> None:
    engine = FakeEngine()

    async def go(batcher: Batcher):
        return await asyncio.gather(
            batcher.translate([[BAD]], DecodingOptions(), "culprit"),
            batcher.translate([[1], [2, 3]], DecodingOptions(), "innocent"),
            return_exceptions=True,
        )

    culprit, innocent = run(go, engine, max_wait_ms=100)
    assert isinstance(culprit, BatchFailed) and "injected fault" in str(culprit)
    assert texts(innocent) == ["1", "2 3"]
    assert len(engine.calls[0]) == 3  # they shared the batch that failed
    assert sorted(map(len, engine.calls[1:])) == [1, 2]  # then one batch per request


def test_the_remaining_batches_of_a_failed_request_are_not_decoded() -> None:
    engine = FakeEngine()

    async def go(batcher: Batcher):
        with pytest.raises(BatchFailed):
            await batcher.translate([[BAD], [1], [2], [3]], DecodingOptions())
        after = await batcher.translate([[4]], DecodingOptions())
        assert batcher.depth == 0
        return after

    # A token budget of one sentence per batch: the request's sentences go in four batches, the first fails.
    after = run(go, engine, max_batch_tokens=1, max_wait_ms=50)
    assert engine.calls == [[[BAD]], [[4]]]
    assert texts(after) == ["4"]
