"""The hostile-client probes of issue 12, rerun against a real mt-serve with its default limits: figures.

    .venv/bin/python benchmarks/probe_hardening.py --model MODEL_DIR [--flood-mb 100]

Starts ``mt-serve`` (defaults, one intra-op thread) on a free loopback port, then prints one line per
probe: a 10 MB header; 4 connections each streaming --flood-mb MB of header (bytes the server took before
closing, its RSS before / peak / after, the slowest /health/ready meanwhile); an idle connection and a
1 byte/s one (seconds until the server closed them, or "open" after 60 s); a lone surrogate; a ``%0a`` in
the path (is the log line escaped?); HEAD /health/ready; a body without Content-Type; SIGTERM (exit status).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "service"))

from live_server import Server, start_server  # noqa: E402 - the test suite's server launcher


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith(field))) / 1024


def connect(server: Server) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)))


def until_closed(sock: socket.socket, trickle: bool, limit_s: float = 60.0) -> str:
    """Seconds until the server closes ``sock`` (sending a header byte a second when ``trickle``)."""
    started = time.monotonic()
    sock.settimeout(1.0)
    if trickle:
        sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    while time.monotonic() - started < limit_s:
        try:
            if trickle:
                sock.sendall(b"s")
            data = sock.recv(4096)
            if not data or data.startswith(b"HTTP/1.1 408"):
                status = "408" if data else "closed"
                return f"{status} after {time.monotonic() - started:.1f} s"
        except TimeoutError:
            continue
        except OSError:
            return f"reset after {time.monotonic() - started:.1f} s"
    return f"open after {limit_s:.0f} s"


def flood(server: Server, megabytes: int, sent: list[int], index: int) -> None:
    chunk = b"a" * 65536
    try:
        with connect(server) as sock:
            sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Flood: ")
            for _ in range(megabytes * 16):
                sock.sendall(chunk)
                sent[index] += len(chunk)
    except OSError:
        pass


def probe_flood(server: Server, megabytes: int) -> str:
    pid = server.process.pid
    before = rss_mb(pid)
    sent = [0] * 4
    threads = [threading.Thread(target=flood, args=(server, megabytes, sent, i)) for i in range(4)]
    for thread in threads:
        thread.start()
    slowest = 0.0
    while any(thread.is_alive() for thread in threads):
        started = time.monotonic()
        try:
            httpx.get(f"{server.url}/health/ready", timeout=10)
            slowest = max(slowest, time.monotonic() - started)
        except httpx.TimeoutException:
            slowest = float("inf")
        time.sleep(0.2)
    taken = ", ".join(f"{n / 2**20:.2f}" for n in sent)
    return (
        f"MB sent before the server closed: {taken} (of {megabytes}); RSS {before:.0f} MB before, "
        f"{rss_mb(pid, 'VmHWM'):.0f} MB peak, {rss_mb(pid):.0f} MB after; slowest /health/ready {slowest:.3f} s"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--flood-mb", type=int, default=100)
    args = parser.parse_args()
    log = Path(tempfile.mkdtemp()) / "server.log"
    server = start_server(["-m", "service.cli"], [args.model.resolve()], log)
    rows: list[tuple[str, str]] = []
    big = httpx.get(f"{server.url}/health/live", headers={"X-Big": "a" * 10_000_000}, timeout=60)
    rows.append(("10 MB header", f"{big.status_code}"))
    rows.append((f"4 x {args.flood_mb} MB header streams", probe_flood(server, args.flood_mb)))
    rows.append(("idle connection", until_closed(connect(server), trickle=False)))
    rows.append(("1 byte/s header", until_closed(connect(server), trickle=True)))
    surrogate = httpx.post(
        f"{server.url}/v1/translate", content=b'{"text": "\\ud800"}', headers={"Content-Type": "application/json"}
    )
    rows.append(("lone surrogate in text", f"{surrogate.status_code}"))
    httpx.get(f"{server.url}/x%0a00:00:00 INFO forged")
    forged = any(line.startswith("00:00:00 INFO forged") for line in log.read_text().splitlines())
    rows.append(("%0a in the path", "forged log line" if forged else "escaped in the log"))
    rows.append(("HEAD /health/ready", f"{httpx.head(f'{server.url}/health/ready').status_code}"))
    bare = httpx.post(f"{server.url}/v1/translate", content=b'{"text": "x"}')
    rows.append(("body without Content-Type", f"{bare.status_code} {bare.json()['detail']}"))
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    status = server.process.wait(60)
    rows.append(("SIGTERM", f"exit status {status} after {time.monotonic() - started:.1f} s"))
    width = max(len(name) for name, _ in rows)
    for name, figure in rows:
        print(f"{name:<{width}}  {figure}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
