"""Hostile-but-legal requests against mt-serve: does one heavy request starve the other clients?

    .venv/bin/python benchmarks/bench_heavy.py --model models/multi30k-de-en \\
        [--tree old=/tmp/old-tree] [--tree new=.] [--tree new-nolimit=.:MT_MAX_OUTPUT_TOKENS=10000000]

Each ``--tree LABEL=DIR[:VAR=VALUE,...]`` is a source tree whose ``service`` package runs the server (so an
older commit checked out with ``git worktree add`` is measured side by side with this one, on the same
model dir and machine), with optional extra settings. Every case starts a fresh server on a loopback port:

1. word: one request holding a single 1,015-letter random "word" (hundreds of subword tokens, decoded to
   source + 50 tokens); a one-sentence request sent 0.5 s later. Prints both latencies.
2. words256: one request of 256 such words (260 KB, legal under the default request limits); twenty
   one-sentence requests sent every 0.5 s from 0.5 s on, concurrently. Prints the heavy request's status
   and time, and the light requests' statuses and p50/p95/max latency (the heavy one is abandoned, its
   client leaving, once the lights are answered).
3. attention: a return_attention request whose response would be over MT_MAX_ATTENTION_CELLS (one short
   sentence, then 59 long ones in one text): time to its 413.
4. leave: the one-word request's client disconnects after 1 s; a one-sentence request sent right after.
   Prints its latency: how long the server kept decoding for a client that was gone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import socket
import statistics
import string
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

LIGHT = "Ein Hund läuft über die Wiese."
PAIR = {"source": "de", "target": "en"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hostile_word(rng: random.Random, n: int = 1015) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(n))


class Server:
    def __init__(self, tree: Path, model: Path, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        code = "import sys; from service.cli import main; sys.exit(main())"
        args = [sys.executable, "-c", code, "--model", str(model), "--port", str(self.port)]
        full_env = {**os.environ, "PYTHONPATH": str(tree), "MT_LOG_LEVEL": "warning", **env}
        self.log = log.open("w")
        self.process = subprocess.Popen(args, cwd=tree, env=full_env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"server in {tree} exited: see {log}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/health/ready", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        raise SystemExit(f"server in {tree} not ready after 120 s: see {log}")

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()
        self.log.close()


async def timed(client: httpx.AsyncClient, body: dict, delay: float = 0.0) -> tuple[int | str, float]:
    await asyncio.sleep(delay)
    started = time.perf_counter()
    try:
        response = await client.post("/v1/translate", json={**PAIR, **body})
        status: int | str = response.status_code
    except httpx.TimeoutException:
        status = "timeout"
    return status, time.perf_counter() - started


async def case_word(url: str) -> str:
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        heavy = asyncio.create_task(timed(client, {"text": hostile_word(random.Random(0))}))
        light = await timed(client, {"text": LIGHT}, 0.5)
        heavy_result = await heavy
    return f"heavy {heavy_result[0]} in {heavy_result[1]:.1f} s; light {light[0]} in {light[1]:.2f} s"


async def case_words256(url: str) -> str:
    rng = random.Random(1)
    async with httpx.AsyncClient(base_url=url, timeout=90) as client:
        heavy = asyncio.create_task(timed(client, {"text": [hostile_word(rng) for _ in range(256)]}))  # noqa: RUF006
        lights = await asyncio.gather(*(timed(client, {"text": LIGHT}, 0.5 + 0.5 * i) for i in range(20)))
        if heavy.done():
            status, seconds = heavy.result()
            heavy_part = f"heavy {status} in {seconds:.1f} s"
        else:
            heavy_part = "heavy still decoding"
            heavy.cancel()  # the client leaves
            with contextlib.suppress(asyncio.CancelledError):
                await heavy
    statuses = Counter(str(status) for status, _ in lights)
    seconds = sorted(t for _, t in lights)
    p50, p95 = statistics.median(seconds), seconds[int(0.95 * (len(seconds) - 1))]
    shown = ", ".join(f"{n}x {status}" for status, n in sorted(statuses.items()))
    return f"{heavy_part}; 20 lights: {shown}, p50 {p50:.2f} s, p95 {p95:.2f} s, max {seconds[-1]:.2f} s"


async def case_attention(url: str) -> str:
    long = "Ein Mann in einem blauen Hemd fährt mit seinem roten Fahrrad schnell über eine breite Straße."
    text = "\n".join(["Ein Hund."] + [long] * 59)
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        status, seconds = await timed(client, {"text": text, "return_attention": True})
    return f"{status} in {seconds:.2f} s"


async def case_leave(url: str) -> str:
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        async with httpx.AsyncClient(base_url=url, timeout=1.0) as impatient:
            gone = await timed(impatient, {"text": hostile_word(random.Random(2))})
        light = await timed(client, {"text": LIGHT})
    return f"client left ({gone[0]}); next request {light[0]} in {light[1]:.2f} s"


CASES = {"word": case_word, "words256": case_words256, "attention": case_attention, "leave": case_leave}


def parse_tree(spec: str) -> tuple[str, Path, dict[str, str]]:
    label, _, rest = spec.partition("=")
    path, _, settings = rest.partition(":")
    env = dict(item.split("=", 1) for item in settings.split(",") if item)
    return label, Path(path).resolve(), env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("models/multi30k-de-en"))
    parser.add_argument("--tree", action="append", default=[], help="LABEL=DIR[:VAR=VALUE,...] (repeatable)")
    parser.add_argument("--case", action="append", choices=sorted(CASES), help="cases to run (default: all)")
    parser.add_argument("--logs", type=Path, default=Path("/tmp"))
    args = parser.parse_args()
    trees = [parse_tree(spec) for spec in args.tree or ["this=."]]
    model = args.model.resolve()
    for case in args.case or list(CASES):
        for label, tree, env in trees:
            server = Server(tree, model, env, args.logs / f"bench_heavy_{label}_{case}.log")
            try:
                print(f"{case:<10} {label:<12} {asyncio.run(CASES[case](server.url))}", flush=True)
            finally:
                server.stop()


if __name__ == "__main__":
    main()
