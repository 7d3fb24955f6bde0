"""Faults and back-pressure against a real server whose engine fails or stalls on marked inputs."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from pathlib import Path

import httpx
from fault_server import FAULT_TEXT, SLOW_TEXT
from live_server import FAULT_ENV, FAULT_SERVER, Server, start_server


async def _post(client: httpx.AsyncClient, text: str | list[str]) -> httpx.Response:
    return await client.post("/v1/translate", json={"text": text})


def test_full_queue_answers_503_with_retry_after(served_model_dir: Path, tmp_path: Path) -> None:
    # An admission budget of 12 tokens: while the slow sentence (5 tokens x beam 4 = 24 = twice the budget)
    # decodes, no other sentence may join, so the others wait in the queue (MT_QUEUE_SIZE=4).
    server = start_server(
        FAULT_SERVER, [served_model_dir], tmp_path / "queue.log", **FAULT_ENV, MT_MAX_BATCH_TOKENS="12"
    )

    async def run() -> tuple[httpx.Response, list[httpx.Response]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            slow = asyncio.ensure_future(_post(client, SLOW_TEXT))  # holds the engine
            await asyncio.sleep(0.5)
            # Four one-sentence requests fill the queue, the rest are refused.
            rest = await asyncio.gather(*(_post(client, "w01 w02") for _ in range(7)))
            return await slow, rest

    slow, rest = asyncio.run(run())
    assert slow.status_code == 200
    refused = [r for r in rest if r.status_code == 503]
    assert refused and len(refused) <= 3, [r.status_code for r in rest]
    assert all(r.headers["retry-after"] == FAULT_ENV["MT_RETRY_AFTER_S"] for r in refused), server.log_tail()
    assert "MT_QUEUE_SIZE" in refused[0].json()["detail"]
    assert all(r.json()["translations"][0]["text"] == "w01 w02" for r in rest if r.status_code == 200)
    server.stop()


def test_a_failing_step_fails_only_the_request_it_fails_on(fault_server: Server) -> None:
    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=fault_server.url, timeout=60) as client:
            slow = asyncio.ensure_future(_post(client, SLOW_TEXT))  # holds the engine while the others queue
            await asyncio.sleep(0.5)
            # Queued together: they join the running batch at the same step, which fails on FAULT_TEXT.
            failed, other = await asyncio.gather(_post(client, FAULT_TEXT), _post(client, ["w03 w04", "w05 w06"]))
            assert (await slow).status_code == 200
            return [failed, other]

    failures_before = fault_server.metric("mt_engine_step_failures_total")
    failed, other = asyncio.run(run())
    assert failed.status_code == 500
    body = failed.json()
    assert body["request_id"] == failed.headers["x-request-id"] and body["request_id"] in body["detail"]
    assert "injected fault" not in body["detail"]  # the engine's error is logged, not shown to clients
    # The shared step failed, then each request was decoded alone: only the one with FAULT_TEXT fails.
    assert other.status_code == 200, other.text
    assert [t["text"] for t in other.json()["translations"]] == ["w03 w04", "w05 w06"]
    assert fault_server.metric("mt_engine_step_failures_total") - failures_before == 2  # shared, then alone
    after = httpx.post(f"{fault_server.url}/v1/translate", json={"text": "w06 w07"}, timeout=30)
    assert after.status_code == 200 and after.json()["translations"][0]["text"] == "w06 w07"
    assert fault_server.metric("mt_engine_step_failures_total") >= 1


def test_a_disconnected_client_has_its_queued_work_dropped(fault_server: Server) -> None:
    sentences_before = fault_server.metric("mt_sentences_total")

    async def run() -> httpx.Response:
        async with httpx.AsyncClient(base_url=fault_server.url, timeout=60) as client:
            slow = asyncio.ensure_future(_post(client, SLOW_TEXT))
            await asyncio.sleep(0.5)
            async with httpx.AsyncClient(base_url=fault_server.url, timeout=0.5) as impatient:
                # The client gives up while its sentences wait behind the slow batch.
                with contextlib.suppress(httpx.TimeoutException):
                    await _post(impatient, ["w01 w02", "w03 w04", "w05 w06"])
            return await slow

    assert asyncio.run(run()).status_code == 200
    time.sleep(0.3)
    assert fault_server.metric("mt_queue_depth") == 0
    assert fault_server.metric("mt_sentences_total") - sentences_before == 1  # only the slow sentence was decoded


def test_sigterm_drains_in_flight_requests(served_model_dir: Path, tmp_path: Path) -> None:
    server = start_server(FAULT_SERVER, [served_model_dir], tmp_path / "drain.log", **FAULT_ENV)

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            pending = [asyncio.ensure_future(_post(client, text)) for text in (SLOW_TEXT, "w01 w02")]
            await asyncio.sleep(0.5)
            server.process.send_signal(signal.SIGTERM)
            return await asyncio.gather(*pending)

    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200, 200]
    assert responses[1].json()["translations"][0]["text"] == "w01 w02"
    # Uvicorn re-raises the signal once it has shut down cleanly, so the exit is "killed by SIGTERM".
    assert server.process.wait(30) in (0, -signal.SIGTERM), server.log_tail()
    assert "Application shutdown complete" in server.log_tail()
