"""Fixtures for the client tests: the tiny copy model exported to ONNX, a real ``mt-serve`` process serving
it on a free loopback port, and a stand-in server in front of it that answers errors on cue."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from export.cli import main as mt_export

READY_TIMEOUT_S = 60

# A stand-in's plan: given the number of translate requests before this one, the (status, Retry-After)
# to answer with instead of forwarding to the real server, or None to forward.
Plan = Callable[[int], "tuple[int, str | None] | None"]


@pytest.fixture(scope="session")
def client_model_dir(trained_model_dir: Path, copy_task_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the trained copy-task model with its fp32 ONNX export (``mt-export``, briefly validated)."""
    model_dir = tmp_path_factory.mktemp("client") / "copy-model"
    shutil.copytree(trained_model_dir, model_dir, ignore=shutil.ignore_patterns("onnx", "checkpoints", "*.png"))
    valid = ["--valid-src", str(copy_task_dir / "test.src"), "--valid-ref", str(copy_task_dir / "test.tgt")]
    assert mt_export([str(model_dir), "--quiet", "--max-sentences", "8", *valid]) == 0
    return model_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def server(client_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The base URL of a real ``mt-serve`` process serving ``client_model_dir`` (stopped after the session)."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "mt-serve.log"
    env = {**os.environ, "MT_THREADS": "1", "MT_LOG_LEVEL": "warning"}
    command = [sys.executable, "-m", "service.cli", "--model", str(client_model_dir), "--port", str(port)]
    with log.open("w") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            assert process.poll() is None, f"mt-serve exited with {process.returncode}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"mt-serve not ready in {READY_TIMEOUT_S} s:\n{log.read_text()[-3000:]}"
            try:
                if httpx.get(f"{url}/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class StandIn:
    """A loopback HTTP server in front of the real one: each ``POST /v1/translate`` is answered as ``plan``
    says (an error status, optionally with Retry-After) or forwarded; bodies and Authorization headers are
    recorded."""

    def __init__(self, upstream: str, plan: Plan) -> None:
        self.upstream = upstream
        self.plan = plan
        self.bodies: list[dict] = []
        self.authorizations: list[str | None] = []  # the Authorization header of each request
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    @property
    def texts(self) -> list[str]:
        """Every text of the requests forwarded or refused, in arrival order."""
        return [text for body in self.bodies for text in body["text"]]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with stand_in.lock:
                    answer = stand_in.plan(len(stand_in.bodies))
                    stand_in.bodies.append(json.loads(body))
                    stand_in.authorizations.append(self.headers.get("Authorization"))
                headers = {"Content-Type": "application/json"}
                if answer is None:
                    upstream = httpx.post(stand_in.upstream + self.path, content=body, headers=headers, timeout=30)
                    status, payload = upstream.status_code, upstream.content
                else:
                    status, retry_after = answer
                    payload = json.dumps({"detail": f"stand-in answers {status}"}).encode()
                    if retry_after is not None:
                        headers["Retry-After"] = retry_after
                self.send_response(status)
                for key, value in {**headers, "Content-Length": str(len(payload))}.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: object) -> None:
                pass

        return Handler

    def __enter__(self) -> StandIn:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def stand_in(server: str) -> Iterator[Callable[[Plan], StandIn]]:
    """``stand_in(plan)`` → a started StandIn in front of ``server`` (shut down after the test)."""
    started: list[StandIn] = []

    def start(plan: Plan) -> StandIn:
        started.append(StandIn(server, plan).__enter__())
        return started[-1]

    yield start
    for s in started:
        s.__exit__()
