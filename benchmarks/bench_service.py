"""HTTP service throughput vs the engine called directly: the same sentences, tokens/s and latency side by side.

    .venv/bin/python benchmarks/bench_service.py --model models/multi30k-de-en [--src FILE] [-n 1000]

1. direct: ``Engine.translate`` over all N sentences in length-sorted batches of ``--max-batch-tokens``
   (latency = time per engine batch).
2. http, C clients (C = 1, 8, 32 by default): an ``mt-serve`` process on a free loopback port (``--loops``
   decode loops, default auto: one per core), C concurrent clients each sending one sentence per request until
   the N are done (latency = per request). The clients (``--client``) speak raw keep-alive HTTP/1.1 by default,
   ~0.2 ms of CPU a request; httpx costs ~2 ms, as much as the server's own HTTP handling.

Tokens are target subword tokens of the output (EOS included), counted the same way for every row. The
clients run in this process on the same machine as the server, so on a small CPU box they take cycles
from it: the CPU columns say how many (CPU seconds of this process, the clients, and of the server
process, from /proc; for the direct row, the engine's). The goal is 32-client throughput ≥ 0.9x the
direct engine's (at its default threads: one engine, onnxruntime's intra-op threads).
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import httpx

from model.decoding import PAPER
from model.model_dir import read_model_dir
from model.tokenizer import Tokenizer
from service.engine import Engine, plan_batches


def sentences(args: argparse.Namespace, tokenizer: Tokenizer) -> list[str]:
    """N sentences from --src (cycled), or made of random word pieces of the model's vocabulary."""
    if args.src:
        data = args.src.read_bytes()
        text = (gzip.decompress(data) if args.src.suffix == ".gz" else data).decode("utf-8")
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return [lines[i % len(lines)] for i in range(args.n)]
    words = [p.lstrip("\u2581") for p in tokenizer.pieces(list(range(4, tokenizer.vocab_size)))]
    words = [w for w in words if w.isalnum()] or ["a"]
    rng = random.Random(0)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(args.n)]


def count_tokens(tokenizer: Tokenizer, texts: list[str]) -> int:
    return sum(len(ids) + 1 for ids in tokenizer.encode_batch(texts))


def percentiles(latencies: list[float]) -> tuple[float, float]:
    ordered = sorted(latencies)
    return statistics.median(ordered) * 1e3, ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))] * 1e3


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` so far (Linux /proc; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14, 15)


def bench_direct(args: argparse.Namespace, texts: list[str]) -> dict:
    engine = Engine.load(args.model, device=args.device, variant=args.variant, threads=args.threads)
    options = replace(PAPER, beam_size=args.beam_size)
    engine.translate(texts[:8], options)  # warm-up
    sources = engine.encode(texts)
    outputs, latencies = [""] * len(texts), []
    started, cpu = time.perf_counter(), time.process_time()
    for batch in plan_batches([len(s) for s in sources], args.beam_size, args.max_batch_tokens):
        t0 = time.perf_counter()
        results = engine.translate_batch([sources[i] for i in batch], options)
        latencies.append(time.perf_counter() - t0)
        for i, result in zip(batch, results, strict=True):
            outputs[i] = result.candidates[0].text
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    return {
        "mode": "direct engine", "clients": "-", "seconds": elapsed, "outputs": outputs, "latencies": latencies,
        "client_cpu": None, "server_cpu": cpu,
    }  # fmt: skip


async def _clients(url: str, texts: list[str], concurrency: int, beam_size: int) -> tuple[list[str], list[float]]:
    outputs, latencies = [""] * len(texts), []
    todo = iter(range(len(texts)))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def worker() -> None:
            for i in todo:
                t0 = time.perf_counter()
                # The direct engine's options: the given beam, the paper's alpha (a model's own default may differ).
                payload = {"text": texts[i], "beam_size": beam_size, "length_penalty": PAPER.length_penalty}
                response = await client.post("/v1/translate", json=payload)
                response.raise_for_status()
                latencies.append(time.perf_counter() - t0)
                outputs[i] = response.json()["translations"][0]["text"]

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return outputs, latencies


async def _lean_clients(url: str, texts: list[str], concurrency: int, beam_size: int) -> tuple[list[str], list[float]]:
    """The same requests over raw keep-alive HTTP/1.1 connections: a load generator that leaves the CPU to the
    server (httpx costs ~2 ms of client CPU per request, as much as the server's whole HTTP handling)."""
    outputs, latencies = [""] * len(texts), []
    todo = iter(range(len(texts)))
    host, port = url.removeprefix("http://").split(":")

    async def worker() -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            for i in todo:
                t0 = time.perf_counter()
                payload = {"text": texts[i], "beam_size": beam_size, "length_penalty": PAPER.length_penalty}
                body = json.dumps(payload).encode()
                head = f"POST /v1/translate HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
                status, *headers = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                length = next(int(h.split(":")[1]) for h in headers if h.lower().startswith("content-length:"))
                answer = await reader.readexactly(length)
                if status.split()[1] != "200":
                    raise RuntimeError(f"{status}: {answer[:300]!r}")
                latencies.append(time.perf_counter() - t0)
                outputs[i] = json.loads(answer)["translations"][0]["text"]
        finally:
            writer.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return outputs, latencies


def bench_http(
    url: str, server_pid: int, texts: list[str], concurrency: int, beam_size: int, client: str = "httpx"
) -> dict:
    clients = _lean_clients if client == "lean" else _clients
    asyncio.run(clients(url, texts[: 2 * concurrency], concurrency, beam_size))  # warm-up
    started, cpu, server = time.perf_counter(), time.process_time(), process_cpu_s(server_pid)
    outputs, latencies = asyncio.run(clients(url, texts, concurrency, beam_size))
    elapsed, cpu, server_after = time.perf_counter() - started, time.process_time() - cpu, process_cpu_s(server_pid)
    return {
        "mode": f"http ({client})", "clients": concurrency, "seconds": elapsed, "outputs": outputs,
        "latencies": latencies, "client_cpu": cpu, "server_cpu": None if server is None else server_after - server,
    }  # fmt: skip


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "MT_THREADS": str(args.threads),
        "MT_DECODE_LOOPS": str(args.loops),
        "MT_DEVICE": args.device,
        "MT_VARIANT": args.variant,
        "MT_MAX_BATCH_TOKENS": str(args.max_batch_tokens),
        "MT_MAX_WAIT_MS": str(args.max_wait_ms),
        "MT_LOG_LEVEL": "warning",
    }
    command = [sys.executable, "-m", "service.cli", "--model", str(args.model), "--port", str(port)]
    process = subprocess.Popen(command, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}/health/ready", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise SystemExit(f"mt-serve did not become ready (exit code {process.poll()})")


def cpu_s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="model directory with onnx/ (run mt-export first)")
    parser.add_argument("--src", type=Path, help="source sentences, one per line, plain or .gz (default: generated)")
    parser.add_argument("-n", type=int, default=1000, help="sentences (default 1000)")
    parser.add_argument("--clients", default="1,8,32", help="concurrent HTTP clients to try (default 1,8,32)")
    parser.add_argument("--beam-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0 = default)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--variant", default="auto", choices=["auto", "fp32", "int8", "fp16"])
    parser.add_argument("--max-batch-tokens", type=int, default=4096)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--loops", type=int, default=0, help="server decode loops (MT_DECODE_LOOPS; 0 = auto)")
    parser.add_argument(
        "--client",
        default="lean",
        choices=["lean", "httpx"],
        help="load generator: raw keep-alive HTTP/1.1 (lean, ~0.2 ms CPU a request) or httpx (~2 ms)",
    )
    args = parser.parse_args()

    tokenizer = Tokenizer(read_model_dir(args.model).tokenizer_file)
    texts = sentences(args, tokenizer)
    rows = [bench_direct(args, texts)]
    process, url = start_server(args)
    try:
        for concurrency in (int(c) for c in args.clients.split(",")):
            rows.append(bench_http(url, process.pid, texts, concurrency, args.beam_size, args.client))
    finally:
        process.terminate()
        process.wait(60)

    print(f"{len(texts)} sentences, beam {args.beam_size}, model {args.model}, {os.cpu_count()} CPUs")
    print(
        f"{'mode':14} {'clients':>7} {'seconds':>8} {'sent/s':>8} {'tokens/s':>9} {'p50 ms':>8} {'p95 ms':>8}  "
        f"{'same':>9} {'server cpu s':>12} {'client cpu s':>12}"
    )
    reference = rows[0]["outputs"]
    for row in rows:
        tokens = count_tokens(tokenizer, row["outputs"])
        p50, p95 = percentiles(row["latencies"])
        row["tokens_per_s"] = tokens / row["seconds"]
        same = sum(a == b for a, b in zip(row["outputs"], reference, strict=True))
        print(
            f"{row['mode']:14} {row['clients']!s:>7} {row['seconds']:>8.2f} {len(texts) / row['seconds']:>8.1f} "
            f"{row['tokens_per_s']:>9.0f} {p50:>8.1f} {p95:>8.1f}  {f'{same}/{len(texts)}':>9} "
            f"{cpu_s(row['server_cpu']):>12} {cpu_s(row['client_cpu']):>12}"
        )
    top = max(rows[1:], key=lambda r: r["clients"])
    ratio = top["tokens_per_s"] / rows[0]["tokens_per_s"]
    print(f"http with {top['clients']} clients / direct engine: {ratio:.2f}x (goal >= 0.9x)")


if __name__ == "__main__":
    main()
