"""mt-serve [--model DIR ...] [--host H] [--port P]: check the model dirs, then serve them with uvicorn.

Every model dir is checked before the server starts (model.json, tokenizer, ONNX manifest and file hashes),
so a missing or corrupt one ends the command with a non-zero status and a message naming the file; a graph
that onnxruntime cannot load (whatever its manifest says) stops the server as soon as loading fails, with
status 1 and the file named. SIGTERM or Ctrl-C starts the drain: ``/health/ready`` answers 503 for
MT_DRAIN_S while requests are still served, then the port closes, in-flight requests finish, the batchers
drain, and the command exits 0. The HTTP limits (head size, read timeouts, connections) are in server.py.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from model.model_dir import ModelDirError
from model.version import package_version
from service.auth import KeyFileError
from service.engine import EngineError, check_model_dir, resolve_device
from service.logs import configure_logging
from service.ratelimit import BadLimit
from service.registry import describe
from service.settings import Settings, settings_help

logger = logging.getLogger("service.cli")

GRACE_S = 5  # added to the request timeout for in-flight requests to finish on shutdown


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="mt-serve",
        description="Serve translation models over HTTP (settings: MT_* environment variables, listed below).",
        epilog=settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    parser.add_argument(
        "--model", action="append", type=Path, metavar="DIR", help="model directory (repeat for several; MT_MODELS)"
    )
    parser.add_argument("--host", help="address to listen on (MT_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (MT_PORT, default 8000)")
    return parser.parse_args(argv)


def load_settings(args: argparse.Namespace) -> Settings:
    overrides = {
        key: value
        for key, value in (("models", args.model), ("host", args.host), ("port", args.port))
        if value is not None
    }
    return Settings(**overrides)


def check_models(settings: Settings) -> None:
    """Raise ModelDirError/EngineError for the first model dir that cannot be served, or two serving one pair."""
    device = resolve_device(settings.device)
    seen: dict[tuple[str, str], Path] = {}
    for path in settings.models:
        info = check_model_dir(path, settings.variant, device).info
        pair = (info.source_lang, info.target_lang)
        if pair in seen:
            raise ModelDirError(
                f"{path / 'model.json'} and {seen[pair] / 'model.json'} both translate {describe([pair])}"
            )
        seen[pair] = path


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = load_settings(args)
    except ValidationError as error:
        print(f"mt-serve: error: invalid settings:\n{error}", file=sys.stderr)
        return 2
    try:
        check_models(settings)
    except (ModelDirError, EngineError) as error:
        print(f"mt-serve: error: {error}", file=sys.stderr)
        return 1
    configure_logging(settings.log_level, settings.log_json)

    import uvicorn  # here, so that a bad model dir is reported without loading the web stack

    from service.app import create_app
    from service.server import LimitedH11Protocol, Server

    try:
        app = create_app(settings)
    except (KeyFileError, BadLimit) as error:
        print(f"mt-serve: error: {error}", file=sys.stderr)
        return 2

    def on_drain() -> None:
        app.state.draining = True
        logger.info("shutting down: /health/ready answers 503 now; the port closes in %g s", settings.drain_s)

    def failed() -> str | None:
        service = getattr(app.state, "service", None)  # set by the lifespan
        return service.error if service is not None else None

    s = settings
    protocol = LimitedH11Protocol.configured(s.header_timeout_s, s.body_timeout_s, s.max_header_bytes)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=protocol,
        h11_max_incomplete_event_size=settings.max_header_bytes,
        limit_concurrency=settings.max_connections,
        timeout_keep_alive=settings.keep_alive_s,
        timeout_graceful_shutdown=int(settings.request_timeout_s) + GRACE_S,
        proxy_headers=True,
        forwarded_allow_ips=settings.forwarded_allow_ips,
        log_config=None,
        access_log=False,
    )
    server = Server(config, settings.drain_s, on_drain, failed)
    server.run()
    if server.failure is not None:
        print(f"mt-serve: error: {server.failure}", file=sys.stderr)
        return 1
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
