"""Hardening against a hostile client, one test per finding of the probe, against real mt-serve processes on
loopback (the HTTP server's own behaviour: head size, read timeouts, connections, logs, exit status)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from live_server import Server, start_server
from test_auth import PLAIN_KEY, bearer, write_keys

LOAD_KEYS = [f"load-key-{i}" for i in range(3)]
KEY_LIMIT = 20  # requests per key per minute on the hardened server
HARDENED_ENV = {
    "MT_MAX_HEADER_BYTES": "8192",
    "MT_HEADER_TIMEOUT_S": "1",
    "MT_BODY_TIMEOUT_S": "1",
    "MT_KEEP_ALIVE_S": "60",
    "MT_MAX_CONNECTIONS": "8",
    "MT_KEY_REQUEST_LIMIT": f"{KEY_LIMIT}/minute",
    "MT_ADDRESS_REQUEST_LIMIT": "1000/minute",
    "MT_MAX_WAIT_MS": "5",
}


@pytest.fixture(scope="module")
def hardened(served_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """mt-serve with keys, rate limits and tight HTTP limits (1 s read timeouts, 8 KiB heads, 8 connections)."""
    root = tmp_path_factory.mktemp("hardened")
    keys = write_keys(root / "keys.txt")
    keys.write_text(keys.read_text() + "".join(f"{key}\n" for key in LOAD_KEYS))
    running = start_server(
        ["-m", "service.cli"], [served_model_dir], root / "server.log", MT_API_KEYS_FILE=str(keys), **HARDENED_ENV
    )
    yield running
    assert running.stop() == 0, running.log_tail()


def address(server: Server) -> tuple[str, int]:
    host, port = server.url.removeprefix("http://").split(":")
    return host, int(port)


def read_until_closed(sock: socket.socket, limit_s: float = 15.0) -> bytes:
    """Everything the server sends until it closes the connection (the limit only guards a broken server)."""
    sock.settimeout(limit_s)
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def logged(server: Server, request_id: str) -> list[str]:
    """The server's log lines of one request, once its access line is written (just after the response)."""
    for _ in range(200):
        lines = [line for line in server.log.read_text().splitlines() if f"[{request_id}]" in line]
        if any("service.access" in line for line in lines):
            return lines
        time.sleep(0.05)
    raise AssertionError(f"no access log line for request {request_id}")


def keyed(server: Server, **body) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/translate", json=body, headers=bearer(PLAIN_KEY), timeout=30)


def test_a_10_mb_header_is_refused_with_431(hardened: Server) -> None:
    response = httpx.get(f"{hardened.url}/health/live", headers={"X-Big": "a" * 10_000_000}, timeout=30)
    assert response.status_code == 431
    assert "MT_MAX_HEADER_BYTES" in response.json()["detail"]
    assert httpx.get(f"{hardened.url}/health/live", headers={"X-Ok": "a" * 4000}).status_code == 200


def test_streams_of_header_bytes_are_cut_off_and_the_loop_stays_responsive(hardened: Server) -> None:
    rss_before = _rss_mb(hardened)
    socks = [socket.create_connection(address(hardened)) for _ in range(4)]
    sent = [0] * len(socks)
    for sock in socks:
        sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Flood: ")
    chunk = b"a" * 65536
    for _ in range(64):  # up to 4 MB each, far past the limit; the server hangs up long before
        for i, sock in enumerate(socks):
            try:
                sock.sendall(chunk)
                sent[i] += len(chunk)
            except OSError:  # reset by the server: it closed the connection
                pass
    answers = []
    for sock in socks:
        try:
            answers.append(read_until_closed(sock))
        except ConnectionResetError:  # the 431 was lost in the reset of our unread flood
            answers.append(b"reset")
        sock.close()
    assert all(a.startswith(b"HTTP/1.1 431 ") or a == b"reset" for a in answers), answers
    assert httpx.get(f"{hardened.url}/health/ready", timeout=5).status_code == 200
    assert _rss_mb(hardened) - rss_before < 50, "the server kept the flood in memory"


def _rss_mb(server: Server) -> float:
    status = Path(f"/proc/{server.process.pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS"))) / 1024


def test_an_idle_connection_is_closed_after_the_header_timeout(hardened: Server) -> None:
    with socket.create_connection(address(hardened)) as sock:
        started = time.monotonic()
        assert read_until_closed(sock) == b""  # closed without a word: nothing was asked
        assert time.monotonic() - started < 10


def test_an_idle_keep_alive_connection_is_not_held_to_the_header_timeout(hardened: Server) -> None:
    with httpx.Client(base_url=hardened.url, timeout=10) as client:
        first = client.get("/health/live")
        # Twice MT_HEADER_TIMEOUT_S: nothing to wait for can show a deadline that never fires, so this waits.
        time.sleep(2.0)
        again = client.get("/health/live")
        assert first.status_code == again.status_code == 200
        # The same connection (httpx would have opened a new one, silently, had the server closed it).
        assert again.extensions["network_stream"] is first.extensions["network_stream"]


def test_a_head_sent_a_byte_at_a_time_gets_408(hardened: Server) -> None:
    with socket.create_connection(address(hardened)) as sock:
        request = b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"s" * 1000
        started = time.monotonic()
        for i in range(len(request)):  # one byte every 50 ms: a complete head would take 50 s
            try:
                sock.sendall(request[i : i + 1])
            except OSError:
                break
            sock.settimeout(0.05)
            try:
                if sock.recv(1, socket.MSG_PEEK):
                    break  # the server answered
            except TimeoutError:
                pass
        answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b"MT_HEADER_TIMEOUT_S" in answer
    assert time.monotonic() - started < 10


def test_a_body_that_stops_arriving_gets_408(hardened: Server) -> None:
    with socket.create_connection(address(hardened)) as sock:
        sock.sendall(
            b"POST /v1/translate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + PLAIN_KEY.encode() + b'\r\nContent-Length: 100\r\n\r\n{"text": '
        )
        answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b"MT_BODY_TIMEOUT_S" in answer


def test_connections_past_the_limit_get_503(hardened: Server) -> None:
    held = []
    try:
        # MT_MAX_CONNECTIONS=8 counts the asking connection too: 7 are served, the 8th is refused. Each held
        # one is answered once, so the server has registered it and keeps it open (keep-alive).
        for _ in range(7):
            client = httpx.Client(base_url=hardened.url, timeout=10)
            assert client.get("/health/live").status_code == 200
            held.append(client)
        refused = httpx.get(f"{hardened.url}/health/live", timeout=10)
        assert refused.status_code == 503
    finally:
        for client in held:
            client.close()
    for _ in range(100):  # the server notices the closes on its next loop turns
        if httpx.get(f"{hardened.url}/health/live", timeout=10).status_code == 200:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("connections were not released")


@pytest.mark.parametrize(
    ("path", "raw"),
    [
        ("/v1/translate", '{"text": "w01 \\ud800 w02"}'),
        ("/v1/translate", '{"text": ["w01", "\\udc00"]}'),
        ("/v1/translate", '{"text": "w01", "source": "\\ud800"}'),
        ("/translate", '{"q": "w01 \\ud800", "source": "src", "target": "tgt"}'),  # LibreTranslate's route
    ],
)
def test_a_lone_surrogate_is_422_without_a_traceback(hardened: Server, path: str, raw: str) -> None:
    response = httpx.post(
        f"{hardened.url}{path}",
        content=raw.encode(),
        headers={**bearer(PLAIN_KEY), "Content-Type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 422, response.text
    assert "lone surrogate (U+D" in json.dumps(response.json())
    lines = logged(hardened, response.headers["x-request-id"])
    assert not any(" ERROR " in line or "Traceback" in line for line in lines), lines


def test_a_newline_in_the_path_cannot_forge_a_log_line(hardened: Server) -> None:
    response = httpx.get(f"{hardened.url}/nothing%0a00:00:00 INFO service.access [forged] GET /admin 200", timeout=10)
    assert response.status_code == 404
    (line,) = logged(hardened, response.headers["x-request-id"])
    assert "GET /nothing\\n00:00:00 INFO service.access [forged] GET /admin 200 404" in line
    log = hardened.log.read_text().splitlines()
    assert not any(line.startswith("00:00:00 INFO service.access [forged]") for line in log)


def test_a_body_without_content_type_is_415_saying_what_to_send(hardened: Server) -> None:
    response = httpx.post(
        f"{hardened.url}/v1/translate", content=b'{"text": "w01"}', headers=bearer(PLAIN_KEY), timeout=10
    )
    assert response.status_code == 415
    assert "no Content-Type" in response.json()["detail"] and "application/json" in response.json()["detail"]


def test_blank_texts_carry_no_attention_unless_asked(hardened: Server) -> None:
    plain = keyed(hardened, text=["", "  \n", "w01 w02"])
    assert plain.json()["translations"] == [{"text": ""}, {"text": "  \n"}, {"text": "w01 w02"}]
    asked = keyed(hardened, text=["", "w01 w02 w03"], return_attention=True).json()["translations"]
    assert asked[0]["attention"] == {"source_tokens": [], "target_tokens": [], "weights": [], "alignment": []}
    assert len(asked[1]["attention"]["alignment"]) == len(asked[1]["text"].split())  # one per target word


def test_head_health_answers_like_get(hardened: Server) -> None:
    for path in ("/health/ready", "/health/live"):
        response = httpx.head(f"{hardened.url}{path}", timeout=10)
        assert response.status_code == 200 and response.content == b""


def test_load_with_keys_and_limits_loses_nothing_and_every_429_has_retry_after(
    hardened: Server, copy_sources: list[str]
) -> None:
    per_key = KEY_LIMIT + 10  # every key goes 10 requests past its limit

    async def run() -> list[tuple[str, str, httpx.Response]]:
        limits = httpx.Limits(max_connections=6)  # under MT_MAX_CONNECTIONS: refusals come from the limiter
        async with httpx.AsyncClient(base_url=hardened.url, timeout=60, limits=limits) as client:

            async def one(key: str, text: str) -> tuple[str, str, httpx.Response]:
                response = await client.post("/v1/translate", json={"text": text}, headers=bearer(key))
                return key, text, response

            jobs = [
                one(key, copy_sources[(k * per_key + i) % len(copy_sources)])
                for i in range(per_key)
                for k, key in enumerate(LOAD_KEYS)
            ]
            return await asyncio.gather(*jobs)

    results = asyncio.run(run())
    assert len(results) == per_key * len(LOAD_KEYS)
    for key in LOAD_KEYS:
        mine = [(text, r) for k, text, r in results if k == key]
        ok = [(text, r) for text, r in mine if r.status_code == 200]
        limited = [r for _, r in mine if r.status_code == 429]
        assert len(ok) == KEY_LIMIT and len(limited) == per_key - KEY_LIMIT, [r.status_code for _, r in mine]
        assert all(r.json()["translations"] == [{"text": text}] for text, r in ok)  # each its own, exact
        assert all(1 <= int(r.headers["retry-after"]) <= 60 for r in limited)


def _broken_decoder_with_a_matching_manifest(model: Path) -> Path:
    decoder = model / "onnx" / "decoder.onnx"
    decoder.write_bytes(b"this is not an ONNX graph")
    manifest_path = model / "onnx" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["decoder.onnx"] = {"sha256": hashlib.sha256(decoder.read_bytes()).hexdigest(), "bytes": 25}
    manifest_path.write_text(json.dumps(manifest))
    return decoder


def test_a_graph_that_cannot_load_ends_mt_serve_naming_it(served_model_dir: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(served_model_dir, model)
    decoder = _broken_decoder_with_a_matching_manifest(model)
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "--model", str(model), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "MT_THREADS": "1"},
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert str(decoder) in result.stderr.splitlines()[-1]


def test_sigterm_drains_with_ready_503_then_exits_0(served_model_dir: Path, tmp_path: Path) -> None:
    server = start_server(["-m", "service.cli"], [served_model_dir], tmp_path / "drain.log", MT_DRAIN_S="4")
    try:
        server.process.send_signal(signal.SIGTERM)
        for _ in range(200):  # the signal is handled on the server's next loop turn
            ready = httpx.get(f"{server.url}/health/ready", timeout=5)
            if ready.status_code == 503:
                break
            time.sleep(0.02)
        assert ready.status_code == 503 and "shutting down" in ready.json()["detail"]
        assert ready.headers["retry-after"]
        during = httpx.post(f"{server.url}/v1/translate", json={"text": "w01 w02"}, timeout=30)
        assert during.status_code == 200 and during.json()["translations"] == [{"text": "w01 w02"}]
        assert server.process.wait(60) == 0, server.log_tail()
    finally:
        server.stop()
    log = server.log_tail()
    assert "shutting down: /health/ready answers 503" in log and "Application shutdown complete" in log


def test_a_bad_key_file_stops_mt_serve_naming_the_line(served_model_dir: Path, tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("good-key\nsha256:not-hex\n")
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "--model", str(served_model_dir), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "MT_API_KEYS_FILE": str(keys)},
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"{keys}:2: `sha256:` must be followed by 64 hex digits" in result.stderr
