"""The HTTP server: uvicorn with its h11 protocol, and the limits that hold when clients connect directly.

From uvicorn's own settings: the request head is parsed by h11 with ``h11_max_incomplete_event_size`` =
MT_MAX_HEADER_BYTES (uvicorn's default httptools parser has no head limit: a 10 MB header was accepted),
``limit_concurrency`` = MT_MAX_CONNECTIONS (503 past it), ``timeout_keep_alive`` = MT_KEEP_ALIVE_S, and
X-Forwarded-For trusted from MT_FORWARDED_ALLOW_IPS only.

What uvicorn has no setting for is added by :class:`LimitedH11Protocol`, a subclass that only keeps time and
counts bytes (h11 still does all the parsing): a request head must arrive within MT_HEADER_TIMEOUT_S and a
body within MT_BODY_TIMEOUT_S (408, then the connection is closed: slow or idle clients can no longer hold
connections open), and a head over MT_MAX_HEADER_BYTES is answered 431 (h11's own refusal is a bare 400).

:class:`Server` adds a drain phase on SIGTERM (``/health/ready`` answers 503 for MT_DRAIN_S while requests
are still served, so a load balancer stops sending new ones), then uvicorn's graceful shutdown, and exits
with status 0 instead of re-raising the signal. It also stops serving when the models fail to load.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from collections.abc import Callable
from http import HTTPStatus
from types import FrameType

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger(__name__)


class LimitedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with deadlines for the request head and body, and 431 for an oversized head."""

    header_timeout_s = 10.0
    body_timeout_s = 30.0
    max_header_bytes = 16_384

    @classmethod
    def configured(cls, header_timeout_s: float, body_timeout_s: float, max_header_bytes: int) -> type:
        """A subclass carrying these limits (uvicorn builds one protocol instance per connection)."""
        limits = {"header_timeout_s": header_timeout_s, "body_timeout_s": body_timeout_s}
        return type(cls.__name__, (cls,), {**limits, "max_header_bytes": max_header_bytes})

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.read_phase: str | None = None
        self.read_deadline: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._set_phase("head")  # a new connection owes a request head at once

    def connection_lost(self, exc: Exception | None) -> None:
        self._set_phase(None)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            pending = self.conn.trailing_data[0] + data  # at most max_header_bytes were kept from before
            end = pending.find(b"\r\n\r\n")
            head = len(pending) if end < 0 else end + 4
            if head > self.max_header_bytes:
                self._refuse(
                    431,
                    f"the request head is over {self.max_header_bytes} bytes: send fewer or "
                    "shorter headers (MT_MAX_HEADER_BYTES)",
                )
                return
        super().data_received(data)
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()

    def _watch(self) -> None:
        """Keep the deadline that matches what the connection waits for: a head, a body, or nothing. Between
        requests of a keep-alive connection nothing is owed (uvicorn's keep-alive timeout closes it when idle)
        until the next head's first bytes arrive; from then on the head deadline runs."""
        if self.transport.is_closing():
            self._set_phase(None)
        elif self.conn.their_state is h11.IDLE:
            started = self.read_phase == "head" or bool(self.conn.trailing_data[0])
            self._set_phase("head" if started else None)
        elif self.conn.their_state is h11.SEND_BODY:
            self._set_phase("body")
        else:
            self._set_phase(None)

    def _set_phase(self, phase: str | None) -> None:
        if phase == self.read_phase:
            return
        if self.read_deadline is not None:
            self.read_deadline.cancel()
            self.read_deadline = None
        self.read_phase = phase
        if phase is not None:
            delay = self.header_timeout_s if phase == "head" else self.body_timeout_s
            self.read_deadline = self.loop.call_later(delay, self._timed_out)

    def _timed_out(self) -> None:
        self.read_deadline = None
        if self.transport.is_closing():
            return
        if self.read_phase == "head" and not self.conn.trailing_data[0]:
            self.transport.close()  # an idle connection: nothing to answer
            return
        what, setting = ("head", "MT_HEADER_TIMEOUT_S") if self.read_phase == "head" else ("body", "MT_BODY_TIMEOUT_S")
        limit = self.header_timeout_s if self.read_phase == "head" else self.body_timeout_s
        self._refuse(408, f"the request {what} did not arrive within {limit:g} s ({setting}): send it at once")

    def _refuse(self, status: int, detail: str) -> None:
        """Answer ``status`` with a JSON body (unless the app has begun a response) and close the connection."""
        self._set_phase(None)
        started = self.cycle is not None and self.cycle.response_started
        if self.cycle is not None:
            self.cycle.disconnected = True  # the app's reads see a disconnect and its writes are dropped
            self.cycle.message_event.set()
        if not started:
            body = json.dumps({"detail": detail}).encode()
            head = (
                f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
            )
            self.transport.write(head.encode("ascii") + body)
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        logger.warning("%s: %d: %s", client, status, detail)
        self.transport.close()


class Server(uvicorn.Server):
    """uvicorn's server with a drain phase on SIGTERM, exit status 0 after it, and a stop on a failed start."""

    def __init__(
        self, config: uvicorn.Config, drain_s: float, on_drain: Callable[[], None], failed: Callable[[], str | None]
    ) -> None:
        super().__init__(config)
        self.drain_s = drain_s
        self.on_drain = on_drain
        self.failed = failed
        self.drain_until: float | None = None
        self.failure: str | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # uvicorn's handler re-raises the signal after shutting down (exit status 143); this one does not.
        if self.drain_until is None:
            self.drain_until = time.monotonic() + self.drain_s
            self.on_drain()
        elif sig == signal.SIGINT and self.should_exit:
            self.force_exit = True  # a second Ctrl-C: stop waiting for in-flight requests
        else:
            self.should_exit = True  # a second signal cuts the drain short

    async def on_tick(self, counter: int) -> bool:
        if self.drain_until is not None and not self.should_exit:
            if counter % 10 == 0 and self.drain_s:
                logger.info("draining: /health/ready answers 503; closing the port in %.0f s", self.remaining())
            if time.monotonic() >= self.drain_until:
                self.should_exit = True
        if self.failure is None and (failure := self.failed()) is not None:
            self.failure = failure
            self.should_exit = True
        return await super().on_tick(counter)

    def remaining(self) -> float:
        return max(0.0, (self.drain_until or 0.0) - time.monotonic())
