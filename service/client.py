"""mt-translate: translate a file line by line, in order, through a server (HTTP) or a model dir in process.

Input lines go out in chunks of ``--batch-lines`` non-empty lines, up to ``--concurrency`` chunks at once;
output is written (and flushed) chunk by chunk in input order, one output line per input line, so an
interrupted run leaves a clean prefix that ``--resume`` continues from. Empty lines are not sent and stay
empty. Against a server, 429/502/503/504 answers and connection errors are retried with exponential
backoff (``Retry-After`` honoured); anything else the server refuses stops the run with its message.
"""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import gzip
import io
import json
import logging
import os
import random
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TextIO

import httpx
from tqdm import tqdm

from model.version import package_version

logger = logging.getLogger("mt-translate")

RETRYABLE = frozenset({429, 502, 503, 504})
MAX_WAIT_S = 60.0  # no single wait between retries is longer than this, whatever Retry-After says


class ClientError(RuntimeError):
    """A failure the user has to act on; the message says what happened and where."""


@dataclass(frozen=True)
class RequestOptions:
    """The request fields shared by every chunk (the pinned ``POST /v1/translate`` body, minus ``text``)."""

    source: str | None = None
    target: str | None = None
    beam_size: int | None = None  # None: the model's default (model.json decoding)
    return_scores: bool = False
    return_attention: bool = False
    patience: float | None = None  # None: the model's default stopping rule (exact unless model.json says)

    def body(self, texts: list[str]) -> dict[str, Any]:
        body: dict[str, Any] = {"text": texts}
        pairs = (
            ("source", self.source),
            ("target", self.target),
            ("beam_size", self.beam_size),
            ("patience", self.patience),
        )
        body |= {key: value for key, value in pairs if value}
        return body | {"return_scores": self.return_scores, "return_attention": self.return_attention}


class Backend(Protocol):
    async def translate(self, texts: list[str]) -> list[dict[str, Any]]:
        """One ``translations`` entry per text, in order."""


def retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delay in seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    if value.strip().isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


def error_detail(response: Any) -> str:
    """The server's ``detail`` (its JSON error body says what to change), else the start of the body."""
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    return json.dumps(detail, ensure_ascii=False) if isinstance(detail, list) else str(detail or response.text[:200])


def check_url(url: str) -> str:
    """The server's base URL without a trailing slash; ClientError at once when it cannot be one (a missing
    scheme would otherwise be retried as a connection error)."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as error:
        raise ClientError(f"--server {url!r} is not a URL ({error}): give one like http://127.0.0.1:8000") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        hint = f"http://{url}" if "://" not in url else "http://127.0.0.1:8000"
        raise ClientError(f"--server {url!r} is not an http:// or https:// URL: give one like {hint}")
    return url.rstrip("/")


# The client's key variable (mt-serve knows it as a client variable and does not warn about it).
API_KEY_ENV = "MT_API_KEY"


def read_api_key(path: Path | None) -> str | None:
    """The key from ``--api-key-file`` (first line) or the environment; a file keeps it out of ``ps``."""
    if path is not None:
        try:
            return path.read_text(encoding="utf-8").strip().splitlines()[0].strip()
        except (OSError, IndexError) as error:
            raise ClientError(f"--api-key-file {path}: cannot read a key from it ({error or 'empty'})") from None
    return os.environ.get(API_KEY_ENV) or None


class HttpBackend:
    """``POST /v1/translate`` with retries: ``retries`` more attempts after the first, waits doubling from
    ``backoff_s`` (with jitter, so that many clients do not retry in step) unless the server says how long.

    A server that cannot be reached on the first request is reported at once (nothing listens there, or the
    URL is wrong); once it has answered, connection errors are retried like 503s (a restart, a blip)."""

    def __init__(
        self,
        url: str,
        request: RequestOptions,
        retries: int = 6,
        timeout_s: float = 120.0,
        backoff_s: float = 0.5,
        api_key: str | None = None,
    ):
        self.url = check_url(url)
        self.request = request
        self.retries = retries
        self.backoff_s = backoff_s
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.AsyncClient(base_url=self.url, timeout=timeout_s, headers=headers)
        self.reached = False

    async def close(self) -> None:
        await self.client.aclose()

    async def translate(self, texts: list[str]) -> list[dict[str, Any]]:
        last = ""
        for attempt in range(self.retries + 1):
            wait = min(self.backoff_s * 2**attempt, MAX_WAIT_S) * random.uniform(0.5, 1.0)
            try:
                response = await self.client.post("/v1/translate", json=self.request.body(texts))
            except httpx.TransportError as error:  # connection refused or reset, timeouts
                last = f"{type(error).__name__}: {error}"
                if not self.reached and isinstance(error, httpx.ConnectError):
                    where = self.url
                    raise ClientError(f"cannot connect to {where} ({last}): is mt-serve running at {where}?") from None
            else:
                self.reached = True
                if response.status_code == 200:
                    return self._translations(response, len(texts))
                last = f"HTTP {response.status_code}: {error_detail(response)}"
                if response.status_code not in RETRYABLE:
                    raise ClientError(f"{self.url} refused the request ({last})")
                told = retry_after(response.headers.get("retry-after"))
                wait = wait if told is None else min(told, MAX_WAIT_S)
            if attempt < self.retries:
                logger.warning("%s: %s; retrying in %.1f s (%d/%d)", self.url, last, wait, attempt + 1, self.retries)
                await asyncio.sleep(wait)
        down = " (is mt-serve still running there?)" if last.startswith(("Connect", "Read", "Remote")) else ""
        raise ClientError(f"{self.url}: giving up after {self.retries + 1} attempts; last error: {last}{down}")

    def _translations(self, response: httpx.Response, expected: int) -> list[dict[str, Any]]:
        try:
            translations = response.json()["translations"]
        except (ValueError, KeyError, TypeError):
            raise ClientError(f"{self.url} answered 200 without a translations list: is it mt-serve?") from None
        if not isinstance(translations, list) or len(translations) != expected:
            raise ClientError(f"{self.url} answered {expected} texts with {translations!r:.200}")
        return translations


class LocalBackend:
    """The service's own path in process (sentence splitting, continuous batcher, engine), with no HTTP: the same
    settings (``MT_`` environment) and so the same output as ``mt-serve`` on the same model dir."""

    def __init__(self, model_dir: Path, request: RequestOptions) -> None:
        self.model_dir = model_dir
        self.request = request
        self.state: Any = None
        self.served: Any = None

    async def open(self) -> None:
        from pydantic import ValidationError

        from model.model_dir import ModelDirError
        from service.engine import EngineError, check_model_dir, resolve_device
        from service.metrics import Metrics
        from service.registry import UnknownPair
        from service.settings import Settings
        from service.state import ServiceState

        try:
            # No request timeout: in process, a chunk waiting behind the others is not a client to give up on.
            settings = Settings(models=[self.model_dir], warmup=False, request_timeout_s=86_400)
            check_model_dir(self.model_dir, settings.variant, resolve_device(settings.device))  # as mt-serve does
        except ValidationError as error:
            raise ClientError(f"invalid MT_ settings in the environment: {error}") from None
        except (ModelDirError, EngineError) as error:
            raise ClientError(str(error)) from None
        self.state = ServiceState(settings, Metrics())
        await self.state.load()
        if self.state.registry is None:
            raise ClientError(f"cannot load {self.model_dir}: {self.state.error}")
        try:
            entry = self.state.registry.resolve(self.request.source, self.request.target)
        except UnknownPair as error:
            raise ClientError(f"{self.model_dir}: {error}") from None
        self.served = await self.state.registry.load(entry)  # the one model, loaded by state.load(): never evicted

    async def close(self) -> None:
        if self.state is not None:
            await self.state.close()

    async def translate(self, texts: list[str]) -> list[dict[str, Any]]:
        from pydantic import ValidationError

        from service import translate as translation
        from service.batcher import BatchFailed, QueueFull, TooManySentences, TooMuchWork
        from service.schemas import TranslateRequest

        try:
            body = TranslateRequest(**self.request.body(texts))
        except ValidationError as error:
            raise ClientError(f"bad options: {error}") from None
        try:
            response = await translation.translate(body, self.served, self.state.settings, "local")
        except QueueFull as error:
            raise ClientError(f"{error}: lower --concurrency or --batch-lines") from None
        except TooManySentences as error:
            raise ClientError(f"{error} (lower --batch-lines, or split long lines)") from None
        except TooMuchWork as error:
            raise ClientError(f"{error} (lower --batch-lines, or set MT_MAX_OUTPUT_TOKENS)") from None
        except translation.TooLarge as error:
            raise ClientError(f"cannot translate with {self.model_dir}: {error}") from None
        except BatchFailed as error:
            raise ClientError(f"decoding failed in {self.model_dir}: {error}") from None
        return response.model_dump(exclude_none=True)["translations"]


def read_lines(path: Path | None) -> list[str]:
    """Lines split at ``\\n`` only (as ``wc -l`` counts them), a trailing ``\\r`` dropped; a ``.gz`` file (or
    gzip data on stdin) is decompressed, as mt-train reads it."""
    data = sys.stdin.buffer.read() if path is None else path.read_bytes()
    if data[:2] == b"\x1f\x8b":  # the gzip magic number, whatever the file is called
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as error:
            raise ClientError(f"{path or 'stdin'} looks gzipped but cannot be read ({error})") from None
    text = data.decode("utf-8")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def chunks(lines: Sequence[str], start: int, size: int) -> list[tuple[int, int]]:
    """Ranges [begin, end) covering lines[start:], each with at most ``size`` non-empty lines."""
    out, begin, sent = [], start, 0
    for i in range(start, len(lines)):
        if lines[i].strip():
            if sent == size:
                out.append((begin, i))
                begin, sent = i, 0
            sent += 1
    if begin < len(lines):
        out.append((begin, len(lines)))
    return out


def record(source: str, translation: dict[str, Any] | None, as_json: bool) -> str:
    """One output line (newline included) for one input line; ``translation`` None for an empty line."""
    translation = translation or {"text": "", "score": 0.0}
    if as_json:
        return json.dumps({"source": source, **translation}, ensure_ascii=False) + "\n"
    # A line in is a line out: a newline inside a translation would shift every line after it.
    return " ".join(translation["text"].splitlines()) + "\n"


def resume_from(path: Path, lines: Sequence[str], as_json: bool) -> list[str]:
    """Translations already in ``path`` (a partly written last line is cut off); the run continues after them.

    ``--json`` output names each line's source, so there a file written for another input is refused."""
    if not path.exists():
        return []
    data = path.read_bytes()
    complete = data.rfind(b"\n") + 1
    if complete < len(data):
        with path.open("r+b") as f:
            f.truncate(complete)
    written = data[:complete].decode("utf-8").split("\n")[:-1]
    if len(written) > len(lines):
        raise ClientError(f"{path} has {len(written)} lines, more than the input's {len(lines)}: wrong file?")
    if not as_json:
        return written
    try:
        records = [json.loads(line) for line in written]
        texts = [r["text"] for r in records]
    except (ValueError, KeyError, TypeError):
        raise ClientError(f"{path} is not --json output: resume with the flags of the interrupted run") from None
    for i, (r, line) in enumerate(zip(records, lines, strict=False)):
        if r.get("source") != line:
            raise ClientError(f"line {i + 1} of {path} translates {r.get('source')!r}, not {line!r}: wrong file?")
    return texts


async def translate_lines(
    lines: Sequence[str],
    start: int,
    backend: Backend,
    out: TextIO,
    *,
    as_json: bool,
    concurrency: int,
    batch_lines: int,
    progress: Any,
) -> list[str]:
    """Translate lines[start:], writing each chunk's lines in order as soon as it and those before are done.

    At most ``concurrency`` requests are in flight and ``2 * concurrency`` chunks started, so memory stays
    bounded however long the input. Returns the translated texts (for scoring).
    """
    slots = asyncio.Semaphore(concurrency)

    async def run(begin: int, end: int) -> list[dict[str, Any]]:
        texts = [line for line in lines[begin:end] if line.strip()]
        if not texts:
            return []
        async with slots:
            return await backend.translate(texts)

    todo = iter(chunks(lines, start, batch_lines))
    window: deque[tuple[int, int, asyncio.Task]] = deque()
    texts: list[str] = []
    try:
        while True:
            while len(window) < 2 * concurrency and (chunk := next(todo, None)):
                window.append((*chunk, asyncio.create_task(run(*chunk))))
            if not window:
                return texts
            begin, end, task = window.popleft()
            results = iter(await task)
            written = []
            for line in lines[begin:end]:
                translation = next(results) if line.strip() else None
                written.append(record(line, translation, as_json))
                texts.append(translation["text"] if translation else "")
            out.write("".join(written))
            out.flush()
            progress.update(end - begin)
    finally:
        for *_, task in window:
            task.cancel()
        await asyncio.gather(*(task for *_, task in window), return_exceptions=True)


def score(hypotheses: list[str], references: list[str], target: str | None) -> str:
    """sacreBLEU corpus BLEU and chrF, each with its signature (the defaults: cased, 13a tokenisation), through
    the same ``score_translations`` that training and export report with."""
    from model.decode import score_translations

    scores = score_translations(hypotheses, references, target or "")
    return (
        f"BLEU = {scores['bleu']:.2f}\n  signature: {scores['bleu_signature']}\n"
        f"chrF2 = {scores['chrf']:.2f}\n  signature: {scores['chrf_signature']}"
    )


class ProgressAwareHandler(logging.Handler):
    """Log lines on stderr above the progress bar rather than through it."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


def configure_logging() -> None:
    handler = ProgressAwareHandler()
    handler.setFormatter(logging.Formatter("mt-translate: %(message)s"))
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="mt-translate",
        description="Translate text one sentence per line (stdin to stdout by default), keeping every line in "
        "order; empty lines stay empty. Through a server (--server) or a model dir in this process (--model).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--server", metavar="URL", help="mt-serve base URL, e.g. http://127.0.0.1:8000")
    where.add_argument("--model", metavar="DIR", type=Path, help="exported model dir, translated in this process")
    parser.add_argument(
        "--api-key-file",
        metavar="FILE",
        type=Path,
        help=f"file holding the API key for a server with keys on (or set {API_KEY_ENV}); sent as a Bearer token",
    )
    parser.add_argument("-i", "--input", metavar="FILE", type=Path, help="input text, plain or .gz (default: stdin)")
    parser.add_argument("-o", "--output", metavar="FILE", type=Path, help="output (default: stdout)")
    parser.add_argument("--source", metavar="S", help="source language (needed when several models are served)")
    parser.add_argument("--target", metavar="T", help="target language (needed when several models are served)")
    parser.add_argument(
        "--beam-size",
        metavar="N",
        type=int,
        default=None,
        help="beam width, 1 = greedy (default: the model's, from its model.json; the paper's 4 unless tuned)",
    )
    parser.add_argument(
        "--patience",
        metavar="P",
        type=float,
        default=None,
        help="stop a sentence once round(beam * P) translations finished (CTranslate2's rule: faster, not exact; "
        "default: the model's, from its model.json: the exact rule, which stops only when no live beam can win)",
    )
    parser.add_argument(
        "--ref", metavar="FILE", type=Path, help="references (plain or .gz): print BLEU and chrF on stderr"
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per line: source, text, score")
    parser.add_argument("--attention", action="store_true", help="with --json: add attention and word alignment")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run into -o FILE")
    parser.add_argument("--concurrency", metavar="N", type=int, default=4, help="requests in flight (default 4)")
    parser.add_argument("--batch-lines", metavar="N", type=int, default=32, help="lines per request (default 32)")
    parser.add_argument("--retries", metavar="N", type=int, default=6, help="retries per request (default 6)")
    parser.add_argument("--timeout", metavar="S", type=float, default=120.0, help="seconds per request (default 120)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    problems = [
        "--resume needs -o FILE" if args.resume and args.output is None else "",
        "--attention needs --json" if args.attention and not args.json else "",
        *(
            f"--{n.replace('_', '-')} must be at least 1"
            for n in ("beam_size", "concurrency", "batch_lines")
            if getattr(args, n) is not None and getattr(args, n) < 1
        ),
        "--retries must be at least 0" if args.retries < 0 else "",
        "--patience must be a number > 0" if args.patience is not None and not args.patience > 0 else "",
    ]
    if args.server:
        try:
            check_url(args.server)
        except ClientError as error:
            problems.append(str(error))
    for problem in filter(None, problems):
        parser.error(problem)
    return args


async def run(args: argparse.Namespace, lines: list[str], done: list[str], out: TextIO) -> list[str]:
    request = RequestOptions(args.source, args.target, args.beam_size, args.json, args.attention, args.patience)
    backend: HttpBackend | LocalBackend
    if args.server:
        backend = HttpBackend(
            args.server, request, retries=args.retries, timeout_s=args.timeout, api_key=read_api_key(args.api_key_file)
        )
    else:
        backend = LocalBackend(args.model, request)
    bar = tqdm(total=len(lines), initial=len(done), unit=" lines", file=sys.stderr, disable=args.quiet, smoothing=0.1)
    try:
        if isinstance(backend, LocalBackend):
            await backend.open()
        return done + await translate_lines(
            lines,
            len(done),
            backend,
            out,
            as_json=args.json,
            concurrency=args.concurrency,
            batch_lines=args.batch_lines,
            progress=bar,
        )
    finally:
        bar.close()
        await backend.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(encoding="utf-8", newline="\n")
    configure_logging()
    try:
        lines = read_lines(args.input)
        references = read_lines(args.ref) if args.ref else None
        if references is not None and len(references) != len(lines):
            raise ClientError(f"{args.ref} has {len(references)} lines but the input has {len(lines)}")
        done = resume_from(args.output, lines, args.json) if args.resume else []
        mode = "a" if args.resume else "w"
        out = sys.stdout if args.output is None else args.output.open(mode, encoding="utf-8", newline="\n")
        try:
            hypotheses = asyncio.run(run(args, lines, done, out))
        finally:
            if out is not sys.stdout:
                out.close()
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, as Unix filters do, without a second error at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (ClientError, OSError, UnicodeDecodeError) as error:
        print(f"mt-translate: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mt-translate: interrupted; continue with --resume", file=sys.stderr)
        return 130
    if references is not None:
        print(score(hypotheses, references, args.target), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
