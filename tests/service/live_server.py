"""Real ``mt-serve`` processes for tests: start one on a free loopback port, wait until ready, read metrics."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
# One intra-op thread, and a batching window wide enough that concurrent requests on a busy 2-core
# machine still meet in one batch.
SERVER_ENV = {"MT_THREADS": "1", "MT_MAX_WAIT_MS": "40", "MT_LOG_LEVEL": "info", "OMP_NUM_THREADS": "1"}
FAULT_SERVER = [str(HERE / "fault_server.py")]
# The fault server's queue: 4 sentences; a slow batch holds the engine for FAULT_SLOW_S seconds.
FAULT_ENV = {
    "MT_DECODE_LOOPS": "1",
    "MT_QUEUE_SIZE": "4",
    "MT_MAX_WAIT_MS": "0",
    "MT_RETRY_AFTER_S": "2",
    "FAULT_SLOW_S": "1.5",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    log: Path

    def log_tail(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")[-4000:]

    def metric(self, name: str) -> float:
        """Sum of a metric's samples (over all labels) from /metrics."""
        text = httpx.get(f"{self.url}/metrics").text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))

    def stop(self) -> int:
        """SIGTERM, then wait; 0 or -SIGTERM (uvicorn re-raises the signal after a clean shutdown) is a clean exit."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


def start_server(script: list[str], models: list[Path], log: Path, **env: str) -> Server:
    """Start ``python SCRIPT --model ... --port P`` and wait until /health/ready says ready."""
    port = free_port()
    args = [sys.executable, *script, "--host", "127.0.0.1", "--port", str(port)]
    for model in models:
        args += ["--model", str(model)]
    with log.open("w") as out:
        process = subprocess.Popen(
            args, cwd=ROOT, env={**os.environ, **SERVER_ENV, **env}, stdout=out, stderr=subprocess.STDOUT
        )
    server = Server(process, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(f"{server.url}/health/ready", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    server.stop()
    raise AssertionError(f"server not ready after 90 s:\n{server.log_tail()}")
