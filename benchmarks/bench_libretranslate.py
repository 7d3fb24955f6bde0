"""The LibreTranslate-compatible routes against /v1/translate on one server: the same sentences, side by side.

    .venv/bin/python benchmarks/bench_libretranslate.py --model models/multi30k-de-en [--src FILE] [-n 512]

Starts ``mt-serve`` on a free loopback port and sends the N sentences in requests of ``--batch`` texts, one
request at a time, four ways: ``POST /v1/translate``; ``POST /translate`` with ``source`` given; with
``source: "auto"`` (language detection first); and with ``format: "html"``, each sentence as
``<p>first <b>second</b> rest</p>`` (word alignment from the attention, then the markup put back). Prints
seconds, sentences/s, the ratio to /v1, and how many outputs equal /v1's (for html: once the tags are
stripped; the tags must all come back).
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

CAPTIONS = [
    "Ein Mann fährt mit dem Fahrrad über eine Brücke.",
    "Zwei Kinder spielen im Schnee.",
    "Eine Frau in einem roten Kleid sitzt auf einer Bank.",
    "Ein Hund läuft über eine grüne Wiese.",
    "Mehrere Männer arbeiten auf einer Baustelle.",
    "Ein kleines Mädchen isst ein Eis.",
    "Ein Junge springt in einen See.",
    "Drei Personen warten an einer Bushaltestelle.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model: Path, threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "MT_THREADS": str(threads), "MT_LOG_LEVEL": "warning"}
    command = [sys.executable, "-m", "service.cli", "--model", str(model), "--port", str(port)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health/ready", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise SystemExit("mt-serve was not ready after 120 s")


def as_html(sentence: str) -> str:
    words = sentence.split()
    return f"<p>{words[0]} <b>{words[1]}</b> {' '.join(words[2:])}</p>" if len(words) > 2 else f"<p>{sentence}</p>"


def run(url: str, texts: list[str], batch: int, mode: str, source: str, target: str) -> tuple[float, list[str]]:
    out: list[str] = []
    started = time.perf_counter()
    with httpx.Client(base_url=url, timeout=300) as client:
        for i in range(0, len(texts), batch):
            chunk = texts[i : i + batch]
            if mode == "v1":
                response = client.post("/v1/translate", json={"text": chunk, "source": source, "target": target})
                response.raise_for_status()
                out += [t["text"] for t in response.json()["translations"]]
                continue
            body = {"q": chunk, "source": "auto" if mode == "auto" else source, "target": target}
            if mode == "html":
                body |= {"q": [as_html(text) for text in chunk], "format": "html"}
            response = client.post("/translate", json=body)
            response.raise_for_status()
            out += response.json()["translatedText"]
    return time.perf_counter() - started, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", type=Path, required=True, help="exported model dir")
    parser.add_argument("--src", type=Path, help="source sentences, one per line (default: built-in captions)")
    parser.add_argument("-n", type=int, default=512, help="sentences (the source cycled)")
    parser.add_argument("--batch", type=int, default=32, help="texts per request")
    parser.add_argument("--threads", type=int, default=1, help="MT_THREADS of the server")
    parser.add_argument("--source", default="de")
    parser.add_argument("--target", default="en")
    args = parser.parse_args(argv)
    lines = args.src.read_text(encoding="utf-8").splitlines() if args.src else CAPTIONS
    lines = [line.strip() for line in lines if line.strip()]
    texts = [lines[i % len(lines)] for i in range(args.n)]
    process, url = start(args.model, args.threads)
    try:
        run(url, texts[:8], 8, "v1", args.source, args.target)  # warm-up
        results = {mode: run(url, texts, args.batch, mode, args.source, args.target) for mode in MODES}
    finally:
        process.terminate()
        process.wait(30)
    base_seconds, base = results["v1"]
    print(f"{len(texts)} sentences, {args.batch} per request, one request at a time, MT_THREADS={args.threads}")
    print(f"{'route':<34} {'seconds':>8} {'sent/s':>8} {'vs /v1':>7} {'same as /v1':>12}")
    for mode, (seconds, out) in results.items():
        shown = [re.sub(r"</?b>|</?p>", "", text) for text in out] if mode == "html" else out
        tags_kept = all(text.count("<b>") == 1 and text.count("</b>") == 1 for text in out) if mode == "html" else True
        same = sum(a == b for a, b in zip(shown, base, strict=True))
        note = "" if tags_kept else "  (tags lost!)"
        print(
            f"{MODES[mode]:<34} {seconds:>8.2f} {len(texts) / seconds:>8.1f} {base_seconds / seconds:>6.2f}x "
            f"{same:>6}/{len(texts)}{note}"
        )
    return 0


MODES = {
    "v1": "POST /v1/translate",
    "text": "POST /translate (source given)",
    "auto": "POST /translate (source auto)",
    "html": "POST /translate (format html)",
}

if __name__ == "__main__":
    sys.exit(main())
