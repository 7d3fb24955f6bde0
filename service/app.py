"""The FastAPI application: lifespan (models load in the background, never at import), request ids and
metrics middleware, and the exception handlers that turn every failure into a status code and a JSON body.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from service.api import app_settings, router
from service.auth import AccessDenied, KeyStore
from service.batcher import BatchFailed, QueueFull, RequestTimeout, TooManySentences, TooMuchWork
from service.engine import SentenceTooLong
from service.langdetect import UndetectableLanguage
from service.libretranslate import LibreError, LibreTranslateErrors
from service.libretranslate import router as libretranslate_router
from service.logs import request_id_var
from service.metrics import Metrics
from service.ratelimit import RateLimiter
from service.registry import AmbiguousPair, ModelUnavailable, UnknownPair
from service.settings import Settings, get_settings, unknown_variables
from service.state import NotReady, ServiceState
from service.translate import BadOption, TooLarge

logger = logging.getLogger("service.access")

REQUEST_ID_HEADER = "x-request-id"
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    state = ServiceState(app_settings(app), app.state.metrics)
    app.state.service = state
    loading = asyncio.create_task(state.load(), name="load-models")
    yield
    # Uvicorn has finished the in-flight requests by now (graceful shutdown); drain what is still queued.
    await loading
    await state.close()


class BodyTooLarge(HTTPException):
    """The request body grew past the limit while it was read (a chunked body has no Content-Length)."""


class RequestContext:
    """Pure ASGI middleware: request id in, X-Request-ID out, a metrics sample and one access log line per
    request; oversized bodies refused with 413 (up front from Content-Length, else once the bytes read pass the
    limit); and any exception a route lets through answered with a 500 JSON body naming the request id.

    ``receive`` is only wrapped to count body bytes, so routes can still watch for a client disconnect."""

    def __init__(self, app, metrics: Metrics, max_body_bytes: int) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes

    def _too_large(self, size: int | None = None) -> str:
        what = "request body" if size is None else f"request body of {size} bytes"
        return f"{what} is over the limit of {self.max_body_bytes} bytes: send fewer or shorter texts"

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        given = headers.get(REQUEST_ID_HEADER.encode(), b"").decode("latin-1")
        request_id = given if _SAFE_ID.match(given) else uuid.uuid4().hex[:16]
        token = request_id_var.set(request_id)
        status = 500
        started = time.perf_counter()
        response_started = False
        received = 0

        async def send_with_id(message: dict) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
                message["headers"] = [*message.get("headers", []), (REQUEST_ID_HEADER.encode(), request_id.encode())]
            await send(message)

        async def counting_receive() -> dict:
            # Raised as an HTTPException so that FastAPI's body reading lets it through to the 413 handler.
            nonlocal received
            if received > self.max_body_bytes:
                raise BodyTooLarge(413, self._too_large())
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLarge(413, self._too_large())
            return message

        try:
            length = headers.get(b"content-length", b"0")
            if length.isdigit() and int(length) > self.max_body_bytes:
                await error_response(413, self._too_large(int(length)), request_id)(scope, receive, send_with_id)
            else:
                await self.app(scope, counting_receive, send_with_id)
        except Exception as error:
            # Inside this middleware (unlike the app's Exception handler), so the answer has the request id in
            # its body and its X-Request-ID header, and the access log and metrics see the 500.
            if response_started:
                raise
            if isinstance(error, HTTPException):  # a BodyTooLarge raised outside a route's body reading
                response = error_response(error.status_code, error.detail, request_id)
            else:
                logger.exception("unhandled error")
                response = error_response(500, f"internal error; report request id {request_id}", request_id)
            await response(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            self.metrics.requests.labels(scope["method"], path, str(status)).inc()
            self.metrics.latency.labels(path).observe(elapsed)
            extra = {"method": scope["method"], "path": scope["path"], "status": status, "duration_ms": elapsed * 1e3}
            logger.info("%s %s %d %.1f ms", scope["method"], scope["path"], status, elapsed * 1e3, extra=extra)
            request_id_var.reset(token)


def error_response(status: int, detail: str | list, request_id: str | None = None, retry_after: int | None = None):
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    body = {"detail": detail, "request_id": request_id or request_id_var.get()}
    return JSONResponse(body, status_code=status, headers=headers)


def _validation_detail(errors: list[dict]) -> tuple[int, str | list]:
    """400 for a body that is not JSON at all; 422 with each field's problem otherwise."""
    broken = [e for e in errors if e.get("type") == "json_invalid"]
    if broken:
        ctx = broken[0].get("ctx", {})
        return 400, f"the body is not valid JSON ({ctx.get('error', 'parse error')}): send a JSON object"
    detail = []
    for e in errors:
        loc = [part for part in e.get("loc", ()) if part != "body"]
        msg = str(e.get("msg", "")).removeprefix("Value error, ")
        detail.append({"loc": loc, "msg": msg, "type": e.get("type")})
    return 422, detail


def add_error_handlers(app: FastAPI) -> None:
    retry = lambda: app_settings(app).retry_after_s  # noqa: E731

    @app.exception_handler(ValidationError)  # a schema a route builds from request data (LibreTranslate's q)
    async def _invalid_inside(request: Request, exc: ValidationError) -> JSONResponse:
        _, detail = _validation_detail(list(exc.errors()))
        return error_response(422, json.loads(json.dumps(detail, default=str)))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        status, detail = _validation_detail(list(exc.errors()))
        return error_response(status, json.loads(json.dumps(detail, default=str)))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        detail = exc.detail
        if exc.status_code == 400:  # FastAPI's answer to a body it cannot decode at all (binary, bad UTF-8)
            detail = f"{detail}: send a UTF-8 JSON object"
        response = error_response(exc.status_code, detail)
        response.headers.update(exc.headers or {})
        return response

    handlers: dict[type[Exception], tuple[int, bool]] = {
        TooLarge: (413, False),
        TooManySentences: (413, False),
        TooMuchWork: (413, False),
        SentenceTooLong: (413, False),
        BadOption: (422, False),
        AmbiguousPair: (422, False),
        UndetectableLanguage: (422, False),
        UnknownPair: (404, False),
        QueueFull: (503, True),
        RequestTimeout: (503, True),
        NotReady: (503, True),
        ModelUnavailable: (503, True),
    }
    for cls, (status, with_retry) in handlers.items():

        async def _domain(request: Request, exc: Exception, status: int = status, with_retry: bool = with_retry):
            return error_response(status, str(exc), retry_after=retry() if with_retry else None)

        app.add_exception_handler(cls, _domain)

    @app.exception_handler(AccessDenied)
    async def _denied(request: Request, exc: AccessDenied) -> JSONResponse:
        response = error_response(exc.status_code, str(exc))
        response.headers.update(exc.headers)
        return response

    @app.exception_handler(BatchFailed)
    async def _batch(request: Request, exc: BatchFailed) -> JSONResponse:
        rid = request_id_var.get()
        # The engine's error text stays in the log (it may name server files or graph internals).
        return error_response(500, f"translation failed on the server (see its log); report request id {rid}")

    @app.exception_handler(Exception)  # the last resort: RequestContext answers most unexpected errors itself
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return error_response(500, f"internal error; report request id {request_id_var.get()}")


def create_app(settings: Settings | None = None) -> FastAPI:
    """The app; ``settings`` replaces the environment's (``get_settings()``).

    The settings live on ``app.state``, not in ``app.dependency_overrides``: any override makes FastAPI
    rebuild every dependency's signature analysis on every request (~40% of a request's event-loop CPU).

    Raises KeyFileError (MT_API_KEYS_FILE) or BadLimit (a rate-limit setting) when those cannot be used."""
    for name, hint in unknown_variables():
        logger.warning("%s is not a setting and is ignored%s", name, f"; did you mean {hint}?" if hint else "")
    app = FastAPIOffline(  # Swagger UI and ReDoc served from the package: /docs works offline
        title="Transformer translation service",
        description="Beam-search translation with ONNX Runtime and continuous batching across requests.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings if settings is not None else get_settings()
    current = app_settings(app)
    app.state.metrics = Metrics()
    app.state.keys = KeyStore.load(current.api_keys_file) if current.api_keys_file else None
    app.state.limiter = RateLimiter(current)
    app.state.draining = False  # mt-serve sets it on SIGTERM
    max_body = current.max_items * (current.max_chars * 6 + 64) + 64 * 1024  # JSON escapes included
    app.add_middleware(RequestContext, metrics=app.state.metrics, max_body_bytes=max_body)
    app.add_middleware(LibreTranslateErrors)  # outside RequestContext, so that its 413 is reshaped too
    if current.cors_origins:  # browser extensions and pages on other origins (off unless MT_CORS_ORIGINS is set)
        app.add_middleware(
            CORSMiddleware,
            allow_origins=current.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
            expose_headers=["Retry-After", "X-Request-ID"],
        )
    add_error_handlers(app)
    app.include_router(router)
    app.include_router(libretranslate_router)
    app.add_exception_handler(LibreError, LibreError.response)
    app.mount("/static", StaticFiles(directory=Path(__file__).with_name("static")), name="static")  # demo page JS/CSS
    return app
