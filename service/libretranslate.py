"""LibreTranslate-compatible routes, so that existing clients and plugins work unchanged (pinned in DESIGN.md):
``POST /translate``, ``GET /languages`` and ``POST /detect``, with JSON, form or multipart bodies.

They run on the service's own translate path (limits, sentence splitting, continuous batcher) and answer in
LibreTranslate's shapes: ``{"translatedText": ..., "alternatives"?: [...], "detectedLanguage"?: {...}}`` (lists
of those for a list ``q``), and errors as ``{"error": ...}`` with LibreTranslate's status codes: 400 for a bad
field or an unsupported language, 401/403 for API keys, 413, 429, 500 and 503 as on ``/v1``.
``source: "auto"`` detects each text's language among the served source languages (service/langdetect.py);
``format: "html"`` translates text nodes and keeps the markup (service/markup.py); ``alternatives: N`` returns
the N next best of the beam (none with html, as LibreTranslate).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Literal

import langcodes
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service import markup
from service import translate as translation
from service.api import RegistryDep, SettingsDep, unless_client_leaves
from service.auth import authorize, charge_chars
from service.langdetect import Detected, UndetectableLanguage, detector_for
from service.logs import request_id_var
from service.registry import AmbiguousPair, ModelEntry, Registry, ServedModel, UnknownPair
from service.schemas import MAX_BEAM, TranslateRequest
from service.settings import Settings

router = APIRouter(tags=["LibreTranslate-compatible"])

PATHS = frozenset({"/translate", "/languages", "/detect"})
# With format=html each segment's attention is used inside the server only (to place the inline tags), never
# returned: it may use this many times MT_MAX_ATTENTION_CELLS.
HTML_ATTENTION_FACTOR = 16


class LibreError(Exception):
    """A request the routes refuse themselves: answered as ``{"error": message}`` with ``status`` (the app
    registers ``LibreError.response`` as its handler)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status

    @staticmethod
    async def response(request: Request, error: LibreError) -> JSONResponse:
        return JSONResponse({"error": str(error)}, status_code=error.status)


class LibreTranslateRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # LibreTranslate clients send fields we do not use (secret, ...)

    q: str | list[str] = Field(description="one text, or a list of texts translated independently")
    source: str = Field("auto", description='source language, or "auto" to detect it among the served ones')
    target: str = Field(description="target language")
    format: Literal["text", "html"] = Field("text", description="html: translate text nodes, keep the markup")
    alternatives: int = Field(0, ge=0, le=MAX_BEAM - 1, description="how many next-best translations to add")
    api_key: str | None = Field(None, description="an API key, when the server needs one")


class DetectRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    q: str | list[str] = Field(description="text whose language to detect")
    api_key: str | None = None


Result = tuple[str, list[str]]  # a translation and its alternatives
TRANSLATE_EXAMPLE = {"q": "Ein Mann fährt Fahrrad.", "source": "auto", "target": "en", "format": "text"}


async def read_fields(request: Request) -> dict[str, Any]:
    """The request's fields from a JSON body, a form (urlencoded or multipart) or the query string."""
    fields: dict[str, Any] = dict(request.query_params)
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media in ("application/x-www-form-urlencoded", "multipart/form-data"):
        form = await request.form()
        for key in form:
            values = [v for v in form.getlist(key) if isinstance(v, str)]
            fields[key] = values if key == "q" and len(values) > 1 else values[-1] if values else None
        return fields
    raw = await request.body()
    if not raw.strip():
        return fields
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as error:
        raise LibreError(400, f"Invalid request: the body is not JSON ({error}); send JSON or a form") from None
    if not isinstance(body, dict):
        raise LibreError(400, "Invalid request: send a JSON object with q, source and target")
    return fields | body


def _parse(model: type[BaseModel], fields: dict[str, Any]) -> Any:
    try:
        return model.model_validate(fields)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg'].removeprefix('Value error, ')}"
            for e in error.errors()
        )
        raise LibreError(400, f"Invalid request: {problems}") from None


async def detect(registry: Registry, texts: list[str]) -> list[Detected]:
    """Each text's language among the served sources (lingua's models load on first use: off the event loop)."""
    detector = detector_for(tuple(registry.sources))
    try:
        return await asyncio.to_thread(lambda: [detector.detect(text) for text in texts])
    except UndetectableLanguage as error:
        raise LibreError(400, str(error)) from None


def language_name(code: str) -> str:
    try:
        return langcodes.Language.get(code).display_name()
    except (ValueError, ImportError, langcodes.tag_parser.LanguageTagError):
        return code


def _resolve(registry: Registry, source: str, target: str) -> ModelEntry:
    try:
        return registry.resolve(source, target)
    except (UnknownPair, AmbiguousPair) as error:
        raise LibreError(400, str(error)) from None


def _request(texts: list[str] | str, n_best: int = 1, attention: bool = False) -> TranslateRequest:
    """A /v1 request with the server's decoding defaults; the beam widened to hold the alternatives asked for."""
    fields: dict[str, Any] = {"text": texts, "n_best": n_best, "return_attention": attention}
    default_beam = TranslateRequest.model_fields["beam_size"].default
    if default_beam is not None and n_best > default_beam:  # a fixed default beam must hold the alternatives
        fields["beam_size"] = n_best
    return TranslateRequest(**fields)


async def _translate_texts(texts: list[str], served: ServedModel, settings: Settings, n_best: int) -> list[Result]:
    """Our own translate path for one model: each text's best translation and the next best ones."""
    if not texts:
        return []
    response = await translation.translate(_request(texts, n_best), served, settings, request_id_var.get())
    return [(t.text, [a.text for a in t.alternatives or []]) for t in response.translations]


async def _translate_aligned(texts: list[str], served: ServedModel, settings: Settings) -> list[markup.Translated]:
    """The best translations with their word alignments (for placing inline tags). The attention stays in the
    server, so it may take HTML_ATTENTION_FACTOR times what a /v1 response may return."""
    if not texts:
        return []
    cells = settings.max_attention_cells * HTML_ATTENTION_FACTOR
    settings = settings.model_copy(update={"max_attention_cells": cells})
    response = await translation.translate(_request(texts, attention=True), served, settings, request_id_var.get())
    return [
        markup.Translated(t.text, [(s, t_) for s, t_ in t.attention.alignment] if t.attention else None)
        for t in response.translations
    ]


async def _translate_html(documents: list[str], served: ServedModel, settings: Settings) -> list[Result]:
    """Each document's text segments translated (with word alignments where inline tags need placing)."""
    parsed = [markup.parse(doc) for doc in documents]
    segments = [(d, i) for d, doc in enumerate(parsed) for i in range(len(doc.segments))]
    tagged = [(d, i) for d, i in segments if parsed[d].with_markup[i]]
    plain = [(d, i) for d, i in segments if not parsed[d].with_markup[i]]
    with_tags, without = await asyncio.gather(
        _translate_aligned([parsed[d].texts[i] for d, i in tagged], served, settings),
        _translate_texts([parsed[d].texts[i] for d, i in plain], served, settings, 1),
    )
    done = dict(zip(tagged, with_tags, strict=True))
    done |= {key: markup.Translated(text) for key, (text, _) in zip(plain, without, strict=True)}
    return [(doc.render([done[(d, i)] for i in range(len(doc.segments))]), []) for d, doc in enumerate(parsed)]


async def _translate_all(
    body: LibreTranslateRequest, request: Request, registry: Registry, settings: Settings
) -> dict[str, Any]:
    """Check the key and the limits, detect the languages if asked, translate each model's texts at once."""
    caller = authorize(request, body.api_key)
    texts = [body.q] if isinstance(body.q, str) else list(body.q)
    if not texts:
        raise LibreError(400, "Invalid request: q is an empty list; send at least one text")
    n_best = body.alternatives + 1
    any_model = next(iter(registry.models.values())).info  # MT_MAX_ITEMS, MT_MAX_CHARS and the beam, as on /v1
    translation.check_limits(_request(texts if isinstance(body.q, list) else texts[0], n_best), settings, any_model)
    auto = body.source.strip().lower() == "auto"
    if auto and body.format == "html":  # the language of the text nodes, not of tag names and attributes
        detected = await detect(registry, [" ".join(markup.parse(text).texts) for text in texts])
    else:
        detected = await detect(registry, texts) if auto else None
    sources = [d.language for d in detected] if detected else [body.source] * len(texts)
    pairs = [_resolve(registry, source, body.target).pair for source in sources]
    charge_chars(request, caller, sum(len(text) for text in texts))

    groups = {pair: [text for text, p in zip(texts, pairs, strict=True) if p == pair] for pair in pairs}

    async def run(pair: tuple[str, str]) -> list[Result]:
        async with registry.use(registry.models[pair]) as served:  # loaded on first use
            if body.format == "html":
                return await _translate_html(groups[pair], served, settings)
            return await _translate_texts(groups[pair], served, settings, n_best)

    per_pair = dict(zip(groups, await asyncio.gather(*(run(pair) for pair in groups)), strict=True))
    items = []
    for k, pair in enumerate(pairs):
        text, alternatives = per_pair[pair].pop(0)
        item: dict[str, Any] = {"translatedText": text}
        if body.alternatives:
            item["alternatives"] = alternatives
        if detected is not None:
            item["detectedLanguage"] = {"confidence": round(detected[k].confidence * 100, 2), "language": sources[k]}
        items.append(item)
    if isinstance(body.q, str):
        return items[0]
    return {key: [item[key] for item in items] for key in items[0]}


@router.post(
    "/translate",
    summary="Translate (LibreTranslate-compatible)",
    openapi_extra={
        "requestBody": {
            "content": {
                "application/json": {
                    "schema": LibreTranslateRequest.model_json_schema(),
                    "example": TRANSLATE_EXAMPLE,
                },
                "application/x-www-form-urlencoded": {"schema": LibreTranslateRequest.model_json_schema()},
            },
            "required": True,
        }
    },
)
async def translate(request: Request, registry: RegistryDep, settings: SettingsDep) -> Any:
    body = _parse(LibreTranslateRequest, await read_fields(request))
    return await unless_client_leaves(request, _translate_all(body, request, registry, settings))


@router.get("/languages", summary="Languages served, by every model whether loaded or not (LibreTranslate-compatible)")
async def languages(request: Request, registry: RegistryDep) -> Any:
    fields = await read_fields(request)
    authorize(request, fields.get("api_key"))
    targets: dict[str, list[str]] = {}
    for source, target in registry.pairs:
        targets.setdefault(source, []).append(target)
        targets.setdefault(target, [])
    return [{"code": code, "name": language_name(code), "targets": t} for code, t in targets.items()]


@router.post(
    "/detect",
    summary="Detect the language of a text (LibreTranslate-compatible)",
    openapi_extra={
        "requestBody": {
            "content": {"application/json": {"schema": DetectRequest.model_json_schema()}},
            "required": True,
        }
    },
)
async def detect_language(request: Request, registry: RegistryDep) -> Any:
    body = _parse(DetectRequest, await read_fields(request))
    authorize(request, body.api_key)
    texts = [body.q] if isinstance(body.q, str) else body.q
    answers = await _detect_all(registry, texts)
    return answers[0] if isinstance(body.q, str) else answers


async def _detect_all(registry: Registry, texts: list[str]) -> list[list[dict[str, Any]]]:
    detector = detector_for(tuple(registry.sources))
    candidates = await asyncio.to_thread(lambda: [detector.candidates(text) for text in texts])
    answers = []
    for text, found in zip(texts, candidates, strict=True):
        if not found or found[0].confidence == 0:  # nothing lingua knows fits: the one served source, or 400
            found = await detect(registry, [text])
        answers.append([{"confidence": round(d.confidence * 100, 2), "language": d.language} for d in found])
    return answers


def _message(body: bytes) -> str:
    try:
        parsed = json.loads(body)
        detail = parsed.get("error", parsed.get("detail"))
    except (ValueError, AttributeError):
        return body.decode("utf-8", "replace")[:300]
    if isinstance(detail, list):  # request validation errors (422 on /v1)
        return "; ".join(f"{'.'.join(str(p) for p in d.get('loc', []))}: {d.get('msg')}" for d in detail)
    return str(detail)


class LibreTranslateErrors:
    """Pure ASGI middleware: on the LibreTranslate paths, every error body (whoever raised it: a route, a
    dependency, the body-size limit) becomes LibreTranslate's ``{"error": message}``; status and headers stay."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] not in PATHS:
            await self.app(scope, receive, send)
            return
        held: dict | None = None
        body = b""

        async def reshape(message: dict) -> None:
            nonlocal held, body
            if message["type"] == "http.response.start" and message["status"] >= 400:
                held = message
                return
            if held is None or message["type"] != "http.response.body":
                await send(message)
                return
            body += message.get("body", b"")
            if message.get("more_body"):
                return
            shaped = json.dumps({"error": _message(body)}, ensure_ascii=False).encode("utf-8")
            headers = [(k, v) for k, v in held["headers"] if k.lower() not in (b"content-length", b"content-type")]
            headers += [(b"content-length", str(len(shaped)).encode()), (b"content-type", b"application/json")]
            await send({**held, "headers": headers})
            await send({"type": "http.response.body", "body": shaped})

        await self.app(scope, receive, reshape)
