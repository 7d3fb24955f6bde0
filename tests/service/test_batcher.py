"""The continuous batcher with a stand-in engine: queue limits, fairness, cancellation, fault isolation; and
several decode loops of one model (``service.loops``): requests spread over them, a failure in one ends the
request in all.

The stand-in decodes a sentence in as many steps as it has tokens and echoes it; it records every step's
live sentences, so the tests see exactly which sentences shared which decoder call.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Sequence

import pytest

from model.decoding import DecodingOptions
from service import batcher as batcher_module
from service.batcher import Batcher, BatchFailed, BatchLimits, QueueFull, RequestTimeout, TooManySentences, TooMuchWork
from service.engine import Candidate, SentenceResult
from service.loops import DecodeLoops, LengthBands
from service.metrics import Metrics

BAD = 99  # a token the stand-in engine fails on
# Steps the engine may make between a sentence's arrival and the boundary where it joins: newcomers join
# every BatchLimits.admit_every_steps (8) steps, and the engine never waits for the event loop (on a loaded
# 2-core machine the loop can lag a few 1 ms steps behind).
LAG = 8 + 5


def echo(source: Sequence[int]) -> SentenceResult:
    return SentenceResult([Candidate(" ".join(map(str, source)), list(source), 0.0)])


class FakeBatch:
    """A running batch: each sentence needs len(source) steps; a step with BAD in it raises."""

    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.live: dict[object, list] = {}  # key -> [source, steps left]
        self.pending: dict[object, list] = {}
        self.last_rows = 0

    @property
    def live_rows(self) -> int:
        return sum(o.beam_size for _, _, o in self.live.values())

    @property
    def idle(self) -> bool:
        return not self.live and not self.pending

    def keys(self) -> list:
        return [*self.live, *self.pending]

    def admit(self, key, source, options) -> None:
        self.pending[key] = [list(source), len(source), options]

    def drop(self, keys) -> None:
        keys = [k for k in keys if k in self.live or k in self.pending]  # not those it just finished
        self.engine.dropped += [self.live[k][0] if k in self.live else self.pending[k][0] for k in keys]
        self.engine.dropped_at.append(len(self.engine.steps))  # before the step that no longer has them
        for key in keys:
            self.live.pop(key, None)
            self.pending.pop(key, None)

    def step(self):
        self.engine.hold.wait(10)
        time.sleep(self.engine.step_seconds)  # a decoder call takes time: the event loop runs meanwhile
        self.live.update(self.pending)
        self.pending = {}
        self.last_rows = self.live_rows
        sources = [entry[0] for entry in self.live.values()]
        self.engine.steps.append(sources)
        self.engine.threads.update((tuple(s), threading.current_thread().name) for s in sources)
        if any(BAD in s for s in sources):
            raise RuntimeError("injected fault")
        out = []
        for key, entry in list(self.live.items()):
            entry[1] -= 1
            if entry[1] == 0:
                del self.live[key]
                out.append((key, echo(entry[0])))
        return out


class FakeEngine:
    name = "fake"
    max_positions = 1024

    def __init__(self, step_seconds: float = 0.001) -> None:
        self.step_seconds = step_seconds
        self.steps: list[list[list[int]]] = []  # the live sources of every step
        self.static: list[list[list[int]]] = []  # translate_batch calls (retries after a failed step)
        self.dropped: list[list[int]] = []
        self.dropped_at: list[int] = []  # steps made when each drop happened
        self.hold = threading.Event()
        self.hold.set()
        self.threads: set[tuple[tuple[int, ...], str]] = set()  # (source, engine thread) of every step

    def open_batch(self) -> FakeBatch:
        return FakeBatch(self)

    def translate_batch(self, sources: Sequence[Sequence[int]], options: DecodingOptions) -> list[SentenceResult]:
        self.static.append([list(s) for s in sources])
        if any(BAD in s for s in sources):
            raise RuntimeError("injected fault")
        return [echo(s) for s in sources]


def run(coroutine_fn, engine: FakeEngine, loops: int = 0, metrics: Metrics | None = None, **limits):
    """Run ``coroutine_fn(batcher)`` with a started batcher over ``engine`` (``loops`` > 0: that many decode loops),
    closing it afterwards."""

    async def main():
        if loops:
            batcher = DecodeLoops(engine, BatchLimits(**limits), metrics or Metrics(), loops)
        else:
            batcher = Batcher(engine, BatchLimits(**limits), metrics or Metrics())
        batcher.start()
        try:
            return await coroutine_fn(batcher)
        finally:
            engine.hold.set()
            await batcher.close()

    return asyncio.run(main())


def texts(results: list[SentenceResult]) -> list[str]:
    return [r.candidates[0].text for r in results]


async def until(condition, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.001)


def test_a_request_larger_than_the_queue_is_refused_but_one_that_fits_an_empty_queue_is_not() -> None:
    async def go(batcher: Batcher):
        with pytest.raises(TooManySentences, match=r"5 sentences.*MT_QUEUE_SIZE=4.*split the request"):
            await batcher.translate([[1]] * 5, DecodingOptions())
        return await batcher.translate([[1], [2], [3], [4]], DecodingOptions())

    assert texts(run(go, FakeEngine(), queue_size=4)) == ["1", "2", "3", "4"]


def test_a_request_that_could_cause_too_much_work_is_refused_before_decoding() -> None:
    engine = FakeEngine()

    async def go(batcher: Batcher):
        # Each sentence may generate source + 50 tokens: 3 x 51 = 153 > 150.
        with pytest.raises(TooMuchWork, match=r"up to 153 target tokens.*MT_MAX_OUTPUT_TOKENS.*max_length"):
            await batcher.translate([[1], [2], [3]], DecodingOptions())
        # The same request with a max_length that bounds it is fine: 3 x 10 = 30.
        return await batcher.translate([[1], [2], [3]], DecodingOptions(max_length=10))

    assert texts(run(go, engine, max_output_tokens=150)) == ["1", "2", "3"]
    assert all([1] not in step or [2] in step for step in engine.steps)  # the refused one never reached it


def test_a_request_that_would_overfill_the_queue_gets_queue_full() -> None:
    engine = FakeEngine()

    async def go(batcher: Batcher):
        engine.hold.clear()
        busy = asyncio.ensure_future(batcher.translate([[1]], DecodingOptions()))  # holds the engine
        await until(lambda: batcher.depth == 0)
        await asyncio.sleep(0.05)
        # The running batch is mid-step: newcomers wait for the next admission (every 8 steps).
        waiting = asyncio.ensure_future(batcher.translate([[2], [3], [4]], DecodingOptions()))
        await asyncio.sleep(0.01)
        assert batcher.depth == 3
        with pytest.raises(QueueFull, match="MT_QUEUE_SIZE=4"):
            await batcher.translate([[5], [6]], DecodingOptions())
        engine.hold.set()
        return await busy, await waiting

    busy, waiting = run(go, engine, queue_size=4, max_wait_ms=0)
    assert texts(busy) == ["1"] and texts(waiting) == ["2", "3", "4"]


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


def steps_with(engine: FakeEngine, source: list[int]) -> list[int]:
    """Indices of the decoder calls that had ``source`` in them."""
    return [i for i, step in enumerate(engine.steps) if source in step]


def test_sentences_join_and_leave_at_every_step() -> None:
    engine = FakeEngine()

    async def go(batcher: Batcher):
        long = asyncio.ensure_future(batcher.translate([[7] * 60], DecodingOptions()))
        await until(lambda: len(engine.steps) >= 3)
        arrived = len(engine.steps)
        short = await batcher.translate([[1, 2]], DecodingOptions())  # joins the running batch
        assert not long.done()  # it finished while the long one was still decoding
        return arrived, await long, short

    arrived, long, short = run(go, engine, max_wait_ms=0)
    assert texts(short) == ["1 2"] and texts(long) == [" ".join(["7"] * 60)]
    shared = steps_with(engine, [1, 2])
    # Joined within a few steps (the engine keeps stepping while the event loop hands it over), for its own two.
    assert len(shared) == 2 and shared[0] <= arrived + LAG
    assert all([7] * 60 in engine.steps[i] for i in shared)  # beside the long one
    assert len(engine.steps) == 60  # the long sentence never waited for anybody


def test_a_heavy_request_cannot_starve_a_light_one() -> None:
    """One request of 40 long sentences fills the admission budget; a one-sentence request that arrives later
    is admitted at the next step and answered after its own few steps, while the heavy one is still going."""
    engine = FakeEngine()
    heavy_sources = [[5] * 30 for _ in range(40)]  # cost (30 + 1) x 4 = 124 each

    async def go(batcher: Batcher):
        heavy = asyncio.ensure_future(batcher.translate(heavy_sources, DecodingOptions(), "heavy"))
        await until(lambda: len(engine.steps) >= 5)
        assert batcher.depth > 0  # the budget holds only part of the heavy request
        arrived = len(engine.steps)
        light = await batcher.translate([[1, 2, 3]], DecodingOptions(), "light")
        assert not heavy.done()
        return arrived, await heavy, light

    arrived, heavy, light = run(go, engine, max_batch_tokens=500, max_wait_ms=0)
    assert texts(light) == ["1 2 3"] and texts(heavy) == [" ".join(["5"] * 30)] * 40
    light_steps = steps_with(engine, [1, 2, 3])
    assert len(light_steps) == 3 and light_steps[0] <= arrived + LAG  # no wait for the heavy sentences to end
    assert max(len(step) for step in engine.steps) <= 500 // 124 + 1  # the budget held, overdrawn by one


def test_freed_rows_go_to_the_request_holding_least() -> None:
    """Two heavy requests queued one after the other share the budget instead of the first taking it all."""
    engine = FakeEngine()

    async def go(batcher: Batcher):
        first = batcher.translate([[1] * 10 for _ in range(12)], DecodingOptions(), "a")
        second = batcher.translate([[2] * 10 for _ in range(12)], DecodingOptions(), "b")
        return await asyncio.gather(first, second)

    run(go, engine, max_batch_tokens=4 * 44, max_wait_ms=0)  # four sentences of cost 44 fit
    later = [step for step in engine.steps[12:] if any(s[0] == 1 for s in step)]
    assert later and all(any(s[0] == 2 for s in step) for step in later)  # once "b" arrived, they always shared


def test_a_cancelled_request_leaves_the_running_batch_at_the_next_step() -> None:
    engine = FakeEngine()
    metrics = Metrics()

    async def go():
        batcher = Batcher(engine, BatchLimits(max_wait_ms=0), metrics)
        batcher.start()
        try:
            gone = asyncio.ensure_future(batcher.translate([[3] * 1000, [4] * 1000], DecodingOptions(), "gone"))
            stays = asyncio.ensure_future(batcher.translate([[6] * 40], DecodingOptions(), "stays"))
            await until(lambda: len(engine.steps) >= 5)
            gone.cancel()  # the client left
            cancelled_at = len(engine.steps)
            await until(lambda: bool(engine.dropped))
            assert engine.dropped_at[0] <= cancelled_at + LAG  # left within a few steps, not the 1000 it asked for
            return await stays
        finally:
            await batcher.close()

    stays = asyncio.run(go())
    assert texts(stays) == [" ".join(["6"] * 40)]
    assert engine.dropped == [[3] * 1000]  # its live sentence left the batch; its queued one never joined
    assert max(steps_with(engine, [3] * 1000)) < engine.dropped_at[0] < 1000  # not the 1000 steps it asked for
    rendered = metrics.render().decode()
    assert 'mt_cancelled_sentences_total{model="fake",stage="decoding"} 1.0' in rendered
    assert 'mt_cancelled_sentences_total{model="fake",stage="queued"} 1.0' in rendered
    assert 'mt_in_flight_requests{model="fake"} 0.0' in rendered


def test_a_request_past_its_deadline_is_answered_and_its_sentences_stop_decoding() -> None:
    engine = FakeEngine()

    async def go(batcher: Batcher):
        with pytest.raises(RequestTimeout, match=r"MT_REQUEST_TIMEOUT_S=0\.2"):
            await batcher.translate([[8] * 100_000], DecodingOptions(max_length=1))
        timed_out = len(engine.steps)
        await asyncio.sleep(0.1)
        return timed_out, len(engine.steps)

    timed_out, later = run(go, engine, request_timeout_s=0.2, max_wait_ms=0)
    assert 0 < timed_out < 100_000 and later <= timed_out + 1  # no step after the next boundary


def test_a_failing_step_is_retried_per_request_so_only_the_culprit_fails() -> None:
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
    assert engine.steps == [[[BAD], [1], [2, 3]]]  # they shared the step that failed
    assert sorted(engine.static) == [[[1], [2, 3]], [[BAD]]]  # then each request was decoded alone


def test_the_waiting_sentences_of_a_failed_request_are_not_decoded() -> None:
    engine = FakeEngine()

    async def go(batcher: Batcher):
        with pytest.raises(BatchFailed):
            await batcher.translate([[BAD], [1], [2], [3]], DecodingOptions())
        after = await batcher.translate([[4]], DecodingOptions())
        assert batcher.depth == 0
        return after

    # A budget of one sentence at a time: the request's first sentence fails, the other three never join.
    after = run(go, engine, max_batch_tokens=1, max_wait_ms=50)
    assert engine.steps == [[[BAD]], [[4]]]
    assert texts(after) == ["4"]


def test_a_culprit_that_leaves_during_its_failing_step_does_not_take_an_innocent_request_with_it() -> None:
    """The step holding both requests raises after the culprit's client left: the innocent one is decoded
    again alone (the step held two requests, so neither is assumed guilty) and gets its translation."""
    engine = FakeEngine()

    async def go(batcher: Batcher):
        engine.hold.clear()  # the first step (both requests in it) waits here
        culprit = asyncio.ensure_future(batcher.translate([[BAD]], DecodingOptions(), "culprit"))
        innocent = asyncio.ensure_future(batcher.translate([[1, 2, 3]], DecodingOptions(), "innocent"))
        await until(lambda: batcher.depth == 0)
        await asyncio.sleep(0.05)
        culprit.cancel()  # the client leaves while the step that will fail is running
        await asyncio.sleep(0.05)
        engine.hold.set()
        return await innocent

    innocent = run(go, engine, max_wait_ms=50)
    assert texts(innocent) == ["1 2 3"]
    assert engine.steps == [[[BAD], [1, 2, 3]]] and engine.static == [[[1, 2, 3]]]


def test_decode_loops_spread_requests_over_their_threads_and_answer_in_order() -> None:
    engine = FakeEngine()
    metrics = Metrics()
    requests = [[[100 * r + i] * (1 + (r + i) % 5) for i in range(1 + r % 4)] for r in range(24)]

    async def go(loops: DecodeLoops):
        results = await asyncio.gather(*(loops.translate(sources, DecodingOptions()) for sources in requests))
        return results, loops._dealt

    results, dealt = run(go, engine, loops=2, metrics=metrics, max_wait_ms=0)
    assert dealt == [0, 0]  # every request's load taken back
    for sources, got in zip(requests, results, strict=True):
        assert texts(got) == [" ".join(map(str, s)) for s in sources]
    threads = {thread for _, thread in engine.threads}
    assert len(threads) == 2  # both loops decoded
    big = requests[3]  # 4 sentences: dealt over both loops
    assert len({thread for source, thread in engine.threads if list(source) in big}) == 2
    rendered = metrics.render().decode()
    for gauge in ("mt_queue_depth", "mt_live_rows", "mt_live_sentences", "mt_in_flight_requests"):
        assert f'{gauge}{{model="fake"}} 0.0' in rendered  # the loops' shares add up to nothing left


def test_one_loop_failing_a_request_ends_its_sentences_in_the_other_loop() -> None:
    engine = FakeEngine()

    async def go(loops: DecodeLoops):
        with pytest.raises(BatchFailed, match="injected fault"):
            await loops.translate([[BAD, 1, 2], [5] * 1000], DecodingOptions())  # one sentence per loop
        failed_at = len(engine.steps)
        await until(lambda: bool(engine.dropped))
        assert loops._dealt == [0, 0]
        return failed_at

    failed_at = run(go, engine, loops=2, max_wait_ms=0)
    assert engine.dropped == [[5] * 1000]  # the other loop's sentence left its batch
    assert engine.dropped_at[0] <= failed_at + LAG
    assert max(steps_with(engine, [5] * 1000)) < 1000  # not the 1000 steps it asked for


def test_the_queue_limit_counts_every_loop() -> None:
    engine = FakeEngine()

    async def go(loops: DecodeLoops):
        engine.hold.clear()
        busy = [asyncio.ensure_future(loops.translate([[i]], DecodingOptions())) for i in (1, 2)]  # one per loop
        await until(lambda: loops.depth == 0)
        await asyncio.sleep(0.05)
        waiting = asyncio.ensure_future(loops.translate([[3], [4], [5]], DecodingOptions()))  # 2 + 1 queued
        await asyncio.sleep(0.01)
        assert loops.depth == 3 and max(loop.depth for loop in loops.loops) == 2
        with pytest.raises(QueueFull, match="MT_QUEUE_SIZE=4"):
            await loops.translate([[6], [7]], DecodingOptions())  # each loop alone would have room for one more
        engine.hold.set()
        answered = [texts(await b) for b in busy], texts(await waiting)
        assert loops._dealt == [0, 0]
        return answered

    busy, waiting = run(go, engine, loops=2, queue_size=4, max_wait_ms=0)
    assert busy == [["1"], ["2"]] and waiting == ["3", "4", "5"]


def test_decode_loops_give_each_loop_a_band_of_source_lengths() -> None:
    """Under load, short and long sentences decode in different loops (less padding in each running batch)."""
    rng = random.Random(1)
    warm_up, held = ([rng.randint(1, 40) for _ in range(64)] for _ in range(2))
    engine = FakeEngine()

    async def go(loops: DecodeLoops):
        await asyncio.gather(*(loops.translate([[7] * n], DecodingOptions()) for n in warm_up))
        engine.threads.clear()
        engine.hold.clear()  # every request of the second wave is dealt while the loops are busy
        waiting = [asyncio.ensure_future(loops.translate([[8] * n], DecodingOptions())) for n in held]
        await asyncio.sleep(0.05)
        engine.hold.set()
        assert [texts(await w) for w in waiting] == [[" ".join(["8"] * n)] for n in held]
        return loops.bands.boundaries

    boundaries = run(go, engine, loops=2, max_wait_ms=0)
    assert len(boundaries) == 1 and 25 <= boundaries[0] <= 35  # length x beam splits in halves near 40 / sqrt(2)
    by_thread: dict[str, list[int]] = {}
    for source, thread in engine.threads:
        by_thread.setdefault(thread, []).append(len(source))
    short, long = sorted(by_thread.values(), key=lambda lengths: sum(lengths) / len(lengths))
    assert sum(long) / len(long) >= 1.5 * sum(short) / len(short)
    above = [n for n in set(held) if n > boundaries[0]]
    assert sum(n in long for n in above) >= 0.8 * len(above)


def test_length_bands_split_the_recent_work_evenly() -> None:
    bands = LengthBands(3, window=56)  # 4 mixes
    assert bands.bands(5) == (0, 2)  # nothing recorded yet: any band
    mix = [10] * 8 + [20] * 4 + [40] * 2  # work ((length + 1) x beam) 352 : 336 : 328
    for _ in range(2):
        bands.record(mix, beam_size=4)
    assert bands.boundaries == [10, 20]
    assert [bands.bands(n) for n in (1, 10, 11, 20, 21, 400)] == [(0, 0), (0, 1), (1, 1), (1, 2), (2, 2), (2, 2)]
    bands.record(list(range(1000, 2000)), beam_size=4)  # one huge request: 16 of its sentences recorded
    assert bands._recorded == 28 + 16
    assert bands.boundaries[0] >= 1000  # the recent work is mostly that request's: every caption is in band 0
    for _ in range(6):  # 84 more sentences push its samples out of the window (recomputed every 16)
        bands.record(mix, beam_size=4)
    assert bands.boundaries == [10, 20]


def test_decode_loops_spread_overlapping_requests_of_one_band_and_of_equal_length() -> None:
    """Requests dealt while the loops are busy spread over both loops though their lengths all fall in one band
    (the load rule), and sentences all of one length are shared evenly (a length on a boundary is in both bands);
    a request cancelled by its client gives its load back."""

    def held_loads(warm_up: list[int], lengths: list[int]):
        engine = FakeEngine()

        async def go(loops: DecodeLoops):
            await asyncio.gather(*(loops.translate([[7] * n], DecodingOptions()) for n in warm_up))
            engine.hold.clear()
            waiting = [asyncio.ensure_future(loops.translate([[8] * n], DecodingOptions())) for n in lengths]
            await asyncio.sleep(0.05)
            loads = list(loops._dealt)  # every request dealt, none answered
            leaving = asyncio.ensure_future(loops.translate([[8] * 30], DecodingOptions()))
            await asyncio.sleep(0.01)
            leaving.cancel()
            with pytest.raises(asyncio.CancelledError):
                await leaving
            engine.hold.set()
            assert [texts(await w) for w in waiting] == [[" ".join(["8"] * n)] for n in lengths]
            return loops.bands.boundaries, loads, list(loops._dealt)

        return run(go, engine, loops=2, max_wait_ms=0)

    boundaries, short, dealt = held_loads(list(range(1, 41)), [2] * 6 + [3] * 6 + [4] * 8)
    assert boundaries[0] > 4 and dealt == [0, 0]  # the short sentences all fall in band 0
    assert min(short) >= 0.3 * sum(short)  # yet loop 1 took a share of them
    boundaries, equal, dealt = held_loads([9] * 32, [9] * 8)
    assert boundaries == [9] and dealt == [0, 0]
    assert equal[0] == equal[1] == 4 * (9 + 1) * 4
