"""Continuous batching in a real mt-serve: a heavy request neither starves light ones nor outlives its client.

The heavy request is 200 long garbage texts; the server's admission budget holds about ten of them at a
time, so decoding them all takes thousands of decoder calls. Light requests sent meanwhile join the running
batch at the next step and are answered while the heavy one is still decoding (a static batcher would make
them wait for all of it), and when the heavy request's client leaves, its sentences leave the batch: the
decoder stops stepping for them and the server is idle again.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from pathlib import Path

import httpx
import pytest
from live_server import Server, start_server

FORWARD = {"source": "src", "target": "tgt"}


@pytest.fixture(scope="module")
def busy_server(served_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("logs") / "continuous.log"
    running = start_server(["-m", "service.cli"], [served_model_dir], log, MT_MAX_WAIT_MS="0")
    yield running
    running.stop()


def heavy_texts(n: int = 200, words: int = 60) -> list[str]:
    rng = random.Random(0)
    return [" ".join(f"w{rng.randint(1, 12):02d}" for _ in range(words)) for _ in range(n)]


async def wait_for(server: Server, name: str, condition, timeout: float = 60.0) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await asyncio.to_thread(server.metric, name)
        if condition(value):
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"{name} never met the condition:\n{server.log_tail()}")


def test_light_requests_are_answered_while_a_heavy_one_decodes_and_a_client_that_leaves_stops_its_work(
    busy_server: Server,
) -> None:
    server = busy_server
    cancelled_before = server.metric("mt_cancelled_sentences_total")
    finished_before = server.metric("mt_sentences_total")

    async def run() -> tuple[list[httpx.Response], float, float, float]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            idle = []
            for text in ("w01 w02", "w03 w04 w05", "w06 w07"):  # latency with the engine idle
                started = time.perf_counter()
                assert (await client.post("/v1/translate", json={"text": text, **FORWARD})).status_code == 200
                idle.append(time.perf_counter() - started)
            heavy = asyncio.ensure_future(client.post("/v1/translate", json={"text": heavy_texts(), **FORWARD}))
            await wait_for(server, "mt_live_sentences", lambda v: v >= 5)  # the heavy request is decoding
            light, busy = [], []
            for text in ("w01 w02", "w03 w04 w05", "w06 w07"):
                started = time.perf_counter()
                light.append(await client.post("/v1/translate", json={"text": text, **FORWARD}))
                busy.append(time.perf_counter() - started)
                assert not heavy.done(), "the heavy request ended before the light ones: nothing was shown"
            # Generous (a shared 2-core machine): within 25x the idle latency, plus half a second.
            print(f"light latency idle {max(idle) * 1e3:.0f} ms, beside the heavy request {max(busy) * 1e3:.0f} ms")
            assert max(busy) < 25 * max(idle) + 0.5, (idle, busy)
            assert await asyncio.to_thread(server.metric, "mt_queue_depth") > 0  # heavy sentences still wait
            # The heavy request's client leaves.
            heavy.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heavy
            steps_at_cancel = await asyncio.to_thread(server.metric, "mt_engine_steps_total")
            await wait_for(server, "mt_in_flight_requests", lambda v: v == 0)
            steps_idle = await asyncio.to_thread(server.metric, "mt_engine_steps_total")
            await asyncio.sleep(0.5)
            steps_later = await asyncio.to_thread(server.metric, "mt_engine_steps_total")
            return light, steps_at_cancel, steps_idle, steps_later

    light, steps_at_cancel, steps_idle, steps_later = asyncio.run(run())
    assert [r.status_code for r in light] == [200, 200, 200]
    assert [r.json()["translations"][0]["text"] for r in light] == ["w01 w02", "w03 w04 w05", "w06 w07"]
    assert steps_later == steps_idle  # nothing decodes for a client that left
    # Its live sentences left at the next step boundary: far fewer calls than the ~100 a sentence needs.
    assert steps_idle - steps_at_cancel < 50, (steps_at_cancel, steps_idle)
    cancelled = server.metric("mt_cancelled_sentences_total") - cancelled_before
    finished = server.metric("mt_sentences_total") - finished_before - 2 * len(light)  # light ones, idle and busy
    assert cancelled >= 1 and cancelled + finished == 200  # every heavy sentence either finished or was dropped
    assert server.metric("mt_live_rows") == 0 and server.metric("mt_queue_depth") == 0
