"""HTTP routes only: each one reads its dependencies and hands the work to the layers below."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from importlib import resources
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from service import translate as translation
from service.auth import CallerDep, charge_chars, require_key
from service.langdetect import detector_for
from service.logs import request_id_var
from service.registry import Registry
from service.schemas import ErrorBody, Health, ModelOut, ModelsResponse, TranslateRequest, TranslateResponse
from service.settings import Settings
from service.state import NotReady, ServiceState

router = APIRouter()
T = TypeVar("T")

JSON_TYPES = ("application/json",)


# The dependencies are ``async def`` though none awaits: FastAPI runs a plain ``def`` dependency in its thread
# pool, a hand-over to a worker thread and back for each (four per /v1/translate request before this).


async def get_state(request: Request) -> ServiceState:
    return request.app.state.service


async def get_registry(state: Annotated[ServiceState, Depends(get_state)]) -> Registry:
    if state.registry is None or state.draining:
        raise NotReady(_not_ready_detail(state))
    return state.registry


async def require_json(request: Request) -> None:
    """415 unless the body is declared as JSON."""
    content_type = request.headers.get("content-type")
    if content_type is None:
        raise HTTPException(415, "the request has no Content-Type: send the JSON body as application/json")
    media = content_type.split(";")[0].strip().lower()
    if media not in JSON_TYPES and not media.endswith("+json"):
        raise HTTPException(415, f"Content-Type {media!r} is not supported: send a JSON body as application/json")


def app_settings(app: FastAPI) -> Settings:
    """The app's settings: the instance ``create_app`` was given, or the environment's (``get_settings``)."""
    return app.state.settings


async def current_settings(request: Request) -> Settings:
    return app_settings(request.app)


SettingsDep = Annotated[Settings, Depends(current_settings)]
StateDep = Annotated[ServiceState, Depends(get_state)]
RegistryDep = Annotated[Registry, Depends(get_registry)]

ERRORS = {
    status: {"model": ErrorBody, "description": text}
    for status, text in {
        400: "the body is not valid JSON",
        401: "an API key is needed (MT_API_KEYS_FILE is set): send Authorization: Bearer <key>",
        403: "the API key is not valid",
        404: "no model for this language pair",
        413: "too many texts or characters",
        415: "the body is not JSON",
        422: "a field is invalid",
        429: "over a rate limit (see Retry-After)",
        500: "decoding failed (the body names the request id)",
        503: "not ready, queue full or timed out (see Retry-After)",
    }.items()
}


def _not_ready_detail(state: ServiceState, draining: bool = False) -> str:
    if state.draining or draining:
        return "the server is shutting down; retry on another instance"
    if state.error:  # the error names server files: it goes to the log, not to clients
        return "models failed to load (the server log says why)"
    return "models are loading; retry shortly"


async def _until_disconnect(request: Request) -> None:
    """Returns when the client goes away (the body is already read, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_client_leaves(request: Request, work: Coroutine[Any, Any, T]) -> T | Response:
    """``work``'s result, or 499 when the client goes away first: cancelling ``work`` drops its still-queued
    sentences (read after the body, so the next message from the client can only be the disconnect)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
    try:
        return await task
    except asyncio.CancelledError:
        if not task.cancelled():
            raise
        return Response(status_code=499)  # nobody is listening; the status is for the log and metrics


@router.post(
    "/v1/translate",
    response_model=TranslateResponse,
    response_model_exclude_none=True,
    responses=ERRORS,
    dependencies=[Depends(require_json)],
    summary="Translate one text or a list of texts",
)
async def translate(
    body: TranslateRequest, request: Request, caller: CallerDep, registry: RegistryDep, settings: SettingsDep
) -> TranslateResponse | Response:
    source = body.source
    if source is not None and source.strip().lower() == "auto":  # lingua, among the served source languages
        detector = detector_for(tuple(registry.sources))
        source = (await asyncio.to_thread(detector.detect, "\n".join(body.texts))).language
    entry = registry.resolve(source, body.target)
    translation.check_limits(body, settings, entry.info)  # before loading the model for a request it refuses
    charge_chars(request, caller, sum(len(text) for text in body.texts))

    async def work() -> TranslateResponse:  # loading the model (on first use) is part of what a client may leave
        async with registry.use(entry) as served:
            return await translation.translate(body, served, settings, request_id_var.get())

    return await unless_client_leaves(request, work())


@router.get(
    "/v1/models",
    response_model=ModelsResponse,
    responses=ERRORS,
    dependencies=[Depends(require_key)],
    summary="Servable models and their pairs, loaded or not",
)
async def models(registry: RegistryDep) -> ModelsResponse:
    out = []
    for entry in registry.models.values():
        info = entry.info
        valid = info.metadata.get("eval", {}).get("valid", {})
        out.append(
            ModelOut(
                name=info.name,
                source=info.source_lang,
                target=info.target_lang,
                variant=entry.served.engine.variant if entry.served else entry.variant,
                device=entry.device,
                bleu=valid.get("bleu"),
                bleu_signature=valid.get("bleu_signature"),
                parameters=info.metadata.get("training", {}).get("parameters"),
                loaded=entry.served is not None,
                status=entry.status,
            )
        )
    return ModelsResponse(models=out)


@router.head("/health/live", include_in_schema=False, response_model=None)  # load balancers probe with HEAD
@router.get(
    "/health/live",
    response_model=Health,
    response_model_exclude_none=True,
    summary="The process is up (HEAD too)",
)
async def live() -> Health:
    return Health(status="ok")


@router.head("/health/ready", include_in_schema=False, response_model=None)
@router.get(
    "/health/ready",
    response_model=Health,
    responses={503: {"model": Health}},
    summary="Models loaded and warm (503 while loading or shutting down; HEAD too)",
)
async def ready(request: Request, state: StateDep, settings: SettingsDep) -> Health | JSONResponse:
    draining = request.app.state.draining  # set by mt-serve on SIGTERM, while requests are still served
    if state.ready and not draining:
        return JSONResponse({"status": "ready"})
    body = {"status": "not ready", "detail": _not_ready_detail(state, draining)}
    return JSONResponse(body, status_code=503, headers={"Retry-After": str(settings.retry_after_s)})


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def index() -> HTMLResponse:
    return HTMLResponse(resources.files("service").joinpath("static/index.html").read_text(encoding="utf-8"))
