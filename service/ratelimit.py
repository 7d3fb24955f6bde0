"""Rate limits per API key and per client address, on requests and on characters of text (429 + Retry-After).

The counting is the ``limits`` library's fixed-window limiter over in-memory storage (one process: each
replica counts its own callers; put a shared limit in the proxy in front when there are several). A limit is
written in ``limits`` notation (``120/minute``, ``5 per 2 seconds``), so its window is part of the setting.

A request is checked against every limit that applies before anything is counted, so a refused request
costs nothing; check and count happen under one lock (FastAPI may call a dependency from worker threads),
so concurrent requests cannot overdraw a limit.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

from limits import RateLimitItem, parse
from limits.storage import MemoryStorage
from limits.strategies import FixedWindowRateLimiter

from service.auth import AccessDenied, Caller
from service.settings import Settings


class BadLimit(ValueError):
    """A rate-limit setting that ``limits`` cannot read; the message names the setting."""


@dataclass(frozen=True)
class Rule:
    setting: str  # the MT_ variable, for messages
    item: RateLimitItem
    per_key: bool  # counted per API key (else per client address)
    chars: bool  # counts characters of text (else requests)


def _rule(settings: Settings, field: str, per_key: bool, chars: bool) -> Rule | None:
    text = getattr(settings, field).strip()
    if not text:
        return None
    name = f"MT_{field.upper()}"
    try:
        item = parse(text)
    except ValueError as e:
        raise BadLimit(
            f"{name}={text!r} is not a rate limit ({e}): write it as `120/minute` or `5 per 2 seconds`"
        ) from e
    return Rule(name, item, per_key, chars)


class RateLimiter:
    """Counts each caller's requests and characters against the configured limits."""

    def __init__(self, settings: Settings) -> None:
        candidates = [
            _rule(settings, "key_request_limit", per_key=True, chars=False),
            _rule(settings, "key_char_limit", per_key=True, chars=True),
            _rule(settings, "address_request_limit", per_key=False, chars=False),
            _rule(settings, "address_char_limit", per_key=False, chars=True),
        ]
        self.rules = [rule for rule in candidates if rule is not None]
        self.limiter = FixedWindowRateLimiter(MemoryStorage())
        self.lock = threading.Lock()

    def charge(self, caller: Caller, requests: int = 0, chars: int = 0) -> None:
        """Count ``requests`` and ``chars`` for ``caller``; AccessDenied 429 (with Retry-After) when that would
        pass a limit, 413 when ``chars`` alone is more than a limit allows in a whole window."""
        charges = []
        for rule in self.rules:
            cost = chars if rule.chars else requests
            if cost == 0 or (rule.per_key and caller.key_id is None):
                continue
            if cost > rule.item.amount:
                raise AccessDenied(
                    413,
                    f"{cost} characters in one request, over the {rule.item} that {rule.setting} allows: "
                    "send the texts in several smaller requests",
                )
            who = f"key:{caller.key_id}" if rule.per_key else f"address:{caller.address}"
            charges.append((rule, who, cost))
        with self.lock:
            self._check_and_hit(charges)

    def _check_and_hit(self, charges: list[tuple[Rule, str, int]]) -> None:
        refused = [(rule, who) for rule, who, cost in charges if not self.limiter.test(rule.item, who, cost=cost)]
        if refused:
            wait = max(self.limiter.get_window_stats(rule.item, who).reset_time for rule, who in refused)
            retry_after = max(1, math.ceil(wait - time.time()))
            rule = refused[0][0]
            what = "characters" if rule.chars else "requests"
            raise AccessDenied(
                429,
                f"over the {what} limit of {rule.item} ({rule.setting}): retry after {retry_after} s",
                {"Retry-After": str(retry_after)},
            )
        for rule, who, cost in charges:
            self.limiter.hit(rule.item, who, cost=cost)
