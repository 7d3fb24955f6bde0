"""API keys: who is calling, from ``MT_API_KEYS_FILE``, checked by a FastAPI dependency (401 / 403).

The file holds one key per line, or ``sha256:<64 hex digits>`` for a key stored as its hash; blank lines and
``# comments`` are skipped. Only SHA-256 digests are kept in memory and compared in constant time; a key is
named in logs and rate-limit buckets by the first 12 hex digits of its digest, never by the key itself.
Without ``MT_API_KEYS_FILE`` no key is needed (the local quick start) and callers are told apart by address.

Note for the LibreTranslate-compatible routes (service/libretranslate.py): call
``authorize(request, api_key)`` with the ``api_key`` field of the request (JSON, form or query; ``None`` when
absent) from your own dependency. It falls back to ``Authorization: Bearer``, charges one request to the
caller's rate limits and returns the :class:`Caller`; after reading the texts, ``charge_chars(request, caller,
n)``. Both raise :class:`AccessDenied` (401/403/413/429): turn it into your ``{"error": ...}`` body with
``exc.status_code``, ``str(exc)`` and ``exc.headers`` (Retry-After, WWW-Authenticate).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

_HASHED = re.compile(r"^sha256:([0-9a-fA-F]{64})$")


class KeyFileError(ValueError):
    """MT_API_KEYS_FILE cannot be used; the message names the file (and line) and what to change."""


class AccessDenied(Exception):
    """A request refused before any work: no key (401), a wrong key (403), over a rate limit (429) or a
    request bigger than a rate limit ever allows (413)."""

    def __init__(self, status_code: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.headers = headers or {}


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


@dataclass(frozen=True)
class KeyStore:
    """The SHA-256 digests of the accepted keys."""

    digests: tuple[bytes, ...]

    @classmethod
    def load(cls, path: Path) -> KeyStore:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise KeyFileError(f"MT_API_KEYS_FILE {path} cannot be read ({e}): give a UTF-8 file of keys") from e
        digests = []
        for number, raw in enumerate(lines, start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("sha256:"):
                hashed = _HASHED.match(line)
                if hashed is None:
                    raise KeyFileError(
                        f"{path}:{number}: `sha256:` must be followed by 64 hex digits (the SHA-256 of the key)"
                    )
                digests.append(bytes.fromhex(hashed.group(1)))
            elif any(c.isspace() for c in line):
                raise KeyFileError(f"{path}:{number}: a key must not contain spaces (one key per line)")
            else:
                digests.append(digest(line))
        if not digests:
            raise KeyFileError(f"MT_API_KEYS_FILE {path} has no keys: add one per line, or unset it to need none")
        return cls(tuple(digests))

    def key_id(self, key: str) -> str | None:
        """The key's short id when the key is accepted, else None (every digest is compared, in constant time)."""
        given = digest(key)
        found = False
        for known in self.digests:
            found |= hmac.compare_digest(given, known)
        return given.hex()[:12] if found else None


@dataclass(frozen=True)
class Caller:
    """Who sent a request: the id of its API key (None when keys are off) and the client address."""

    key_id: str | None
    address: str


def client_address(request: Request) -> str:
    # The peer, or the client named by X-Forwarded-For when the peer is in MT_FORWARDED_ALLOW_IPS (uvicorn).
    return request.client.host if request.client else "unknown"


def authorize(request: Request, key: str | None) -> Caller:
    """Check ``key`` (or the Bearer token when ``key`` is empty) and charge one request to the rate limits."""
    keys: KeyStore | None = request.app.state.keys
    if not key:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        key = token.strip() if scheme.lower() == "bearer" and token.strip() else None
    key_id = None
    if keys is not None:
        if key is None:
            raise AccessDenied(
                401,
                "an API key is required: send `Authorization: Bearer <key>`",
                {"WWW-Authenticate": "Bearer"},
            )
        key_id = keys.key_id(key)
        if key_id is None:
            raise AccessDenied(403, "the API key is not valid: check it with the server's operator")
    caller = Caller(key_id, client_address(request))
    request.app.state.limiter.charge(caller, requests=1)
    return caller


def charge_chars(request: Request, caller: Caller, chars: int) -> None:
    """Charge ``chars`` characters of text to the caller's character limits (AccessDenied 429/413 past them)."""
    request.app.state.limiter.charge(caller, chars=chars)


_bearer = HTTPBearer(auto_error=False, description="an API key from MT_API_KEYS_FILE (when the server has one)")


async def require_key(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Caller:
    """The dependency of the /v1 routes: the Bearer key checked, one request charged (shown in /docs).
    ``async`` so that FastAPI runs it on the event loop rather than in a worker thread."""
    return authorize(request, credentials.credentials if credentials else None)


CallerDep = Annotated[Caller, Depends(require_key)]
