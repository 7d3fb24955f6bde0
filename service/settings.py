"""Service settings: one pydantic-settings class (environment prefix ``MT_``), read through ``get_settings()``.

Nothing here runs at import: the settings are built on first use by ``get_settings()`` (cached), unless
``create_app(settings)`` is given an instance (tests and ``mt-serve`` do); routes read them from the app.
"""

from __future__ import annotations

import difflib
import os
import textwrap
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_MODEL = Path("models/multi30k-de-en")


class Settings(BaseSettings):
    """Every knob of the service; each field is the environment variable ``MT_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="MT_", extra="ignore")

    # Models and where they run.
    models: Annotated[list[Path], NoDecode] = Field(
        default_factory=lambda: [DEFAULT_MODEL],
        description="model directories to serve (MT_MODELS: separated by commas or the OS path separator)",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = CUDA when onnxruntime has it")
    variant: Literal["auto", "fp32", "int8", "fp16"] = Field(
        "auto",
        description=(
            "ONNX variant; auto = fp16 on CUDA when exported (unless validation found it losing over 0.5 BLEU); on "
            "CPU int8 when the export validated it within 0.1 BLEU of fp32, else fp32"
        ),
    )
    threads: int = Field(
        0,
        ge=0,
        description="onnxruntime intra-op threads per model; 0 = auto: on CPU the cores shared among the decode loops, "
        "on CUDA onnxruntime's default",
    )
    decode_loops: int = Field(
        0,
        ge=0,
        description="running decoder batches per model, each on its own thread, requests spread over them; 0 = auto: "
        "on CPU one per core (at most 4), on CUDA 1. Each loop admits up to MT_MAX_BATCH_TOKENS",
    )
    warmup: bool = Field(True, description="decode a sentence per model before reporting ready")
    max_loaded_models: int = Field(
        0,
        ge=0,
        description="models held loaded at once (each holds its ONNX sessions: ~300 MB for an fp32 OPUS-MT model); "
        "0 = no limit. Start-up loads the first model before reporting ready and the next ones, up to this many, "
        "in the background; the others load on first use, evicting the least recently used idle model",
    )

    host: str = Field("127.0.0.1", description="address mt-serve listens on (0.0.0.0 in a container)")
    port: int = Field(8000, ge=0, le=65535, description="port mt-serve listens on")

    # Request limits.
    max_items: int = Field(256, ge=1, description="texts per request (413 above)")
    max_chars: int = Field(10_000, ge=1, description="characters per text (413 above)")
    max_beam: int = Field(16, ge=1, description="largest beam_size a request may ask for (422 above)")
    split_sentences: bool = Field(True, description="split texts into sentences (and lines) and rejoin them")
    max_attention_cells: int = Field(
        250_000,
        ge=1,
        description="attention weights one response may return with return_attention (413 above): each text's "
        "matrix is its target tokens x its source tokens (sentences laid out block-diagonally, so it grows with "
        "the square of the text's length), summed over the texts; 250,000 is about 2,000 characters of text",
    )

    max_output_tokens: int = Field(
        100_000,
        ge=1,
        description="target tokens one request may make the engine generate at most (413 before decoding above): "
        "each sentence counts its longest possible output (source tokens + 50, or the request's max_length)",
    )

    # Continuous batching.
    max_batch_tokens: int = Field(
        4096,
        ge=1,
        description="admission budget of the running decoder batch: source tokens x beam size of its sentences "
        "(a request holding no rows may still join up to twice this, so nobody waits for a long decode)",
    )
    admit_every_steps: int = Field(
        8,
        ge=1,
        description="while the decoder batch is running, waiting sentences join it every this many steps, together "
        "(each joining costs an encoder call and a copy of the cache; 1 = at every step)",
    )
    max_wait_ms: float = Field(
        5.0, ge=0, description="when the engine is idle, how long a first sentence waits for others to start with it"
    )
    queue_size: int = Field(
        2048, ge=1, description="sentences waiting to join the decoder batch before requests get 503"
    )
    request_timeout_s: float = Field(60.0, gt=0, description="a request still undecoded after this gets 503")
    retry_after_s: int = Field(1, ge=0, description="the Retry-After header of 503 answers, in seconds")

    # Access: API keys and rate limits (see service/auth.py and service/ratelimit.py).
    api_keys_file: Path | None = Field(
        None,
        description="file of API keys, one per line (`sha256:<hex>` for a hashed key, # comments); unset = no keys "
        "needed; set = every route but health, metrics and the demo page needs `Authorization: Bearer <key>`",
    )
    key_request_limit: str = Field(
        "", description="requests per API key, as `120/minute` (`limits` notation; empty = none)"
    )
    key_char_limit: str = Field("", description="characters of text per API key, as `200000/minute` (empty = none)")
    address_request_limit: str = Field("", description="requests per client address, as `60/minute` (empty = none)")
    address_char_limit: str = Field("", description="characters of text per client address, as `100000/minute`")

    # HTTP server limits (uvicorn with h11; see service/server.py).
    max_header_bytes: int = Field(16_384, ge=1024, description="request line + headers; 431 above")
    header_timeout_s: float = Field(10.0, gt=0, description="time a client has to send a request's headers (408)")
    body_timeout_s: float = Field(30.0, gt=0, description="time a client has to send a request's body (408)")
    keep_alive_s: int = Field(5, ge=1, description="an idle keep-alive connection is closed after this")
    max_connections: int = Field(
        1000, ge=2, description="open connections (the asking one included) at which requests get 503 (uvicorn)"
    )
    drain_s: float = Field(
        0.0, ge=0, description="on SIGTERM, keep serving this long with /health/ready at 503 before closing the port"
    )
    forwarded_allow_ips: str = Field(
        "127.0.0.1",
        description="proxies whose X-Forwarded-For names the client (for per-address limits); `*` = any",
    )

    # Browsers: origins allowed to call the API from their pages (CORS).
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="origins allowed by CORS, separated by commas (`*` = any, e.g. for browser extensions); "
        "empty = CORS off (browsers refuse other origins' pages)",
    )

    # Logging.
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_json: bool = Field(False, description="one JSON object per log line (with the request id)")

    @field_validator("models", mode="before")
    @classmethod
    def _split_models(cls, value: object) -> object:
        if isinstance(value, str):
            parts = value.replace(os.pathsep, ",").split(",")
            return [part.strip() for part in parts if part.strip()]
        return value

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("models")
    @classmethod
    def _some_models(cls, value: list[Path]) -> list[Path]:
        if not value:
            raise ValueError("give at least one model directory (--model DIR or MT_MODELS)")
        return value


# MT_ variables that are not settings but are read elsewhere (docker/compose.yaml).
OTHER_VARIABLES = frozenset({"MT_REPLICAS", "MT_USER_MODELS", "MT_PUBLISH_PORT", "MT_PUBLISH_ADDRESS", "MT_API_KEY"})


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[tuple[str, str | None]]:
    """``MT_`` environment variables that are no setting (a typo such as MT_MODEL is otherwise silently
    ignored), each with the closest setting's name when there is one."""
    environ = os.environ if environ is None else environ
    known = [f"MT_{name.upper()}" for name in Settings.model_fields]
    out = []
    for name in sorted(environ):
        upper = name.upper()
        if upper.startswith("MT_") and upper not in known and upper not in OTHER_VARIABLES:
            close = difflib.get_close_matches(upper[3:], [k[3:] for k in known], n=1, cutoff=0.7)
            out.append((name, f"MT_{close[0]}" if close else None))
    return out


def settings_help(width: int = 100) -> str:
    """Every setting as ``MT_NAME (default): what it does``, for ``mt-serve --help``."""
    lines = ["settings (environment variables; --model, --host and --port override theirs):"]
    for name, field in Settings.model_fields.items():
        default = field.default_factory() if field.default_factory is not None else field.default
        if isinstance(default, list):
            default = ",".join(str(item) for item in default)
        head = f"  MT_{name.upper()} (default {'empty' if default in ('', None) else default})"
        text = (field.description or "").replace("`", "")
        lines += textwrap.wrap(f"{head}: {text}" if text else head, width, subsequent_indent="      ")
    return "\n".join(lines)


@lru_cache
def get_settings() -> Settings:
    """The process's settings, read from the environment once (``create_app(settings)`` takes others)."""
    return Settings()
