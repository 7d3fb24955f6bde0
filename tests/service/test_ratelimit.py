"""Rate limits per key and per address, on requests and characters: the limiter alone, then over the app."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from test_auth import PLAIN_KEY, bearer, wait_ready, write_keys

from service.app import create_app
from service.auth import AccessDenied, Caller
from service.ratelimit import BadLimit, RateLimiter
from service.settings import Settings

ALICE = Caller("a" * 12, "10.0.0.1")
BOB = Caller("b" * 12, "10.0.0.2")
BOB_AT_ALICES = Caller("b" * 12, "10.0.0.1")


def refused(limiter: RateLimiter, caller: Caller, **cost: int) -> AccessDenied:
    with pytest.raises(AccessDenied) as info:
        limiter.charge(caller, **cost)
    return info.value


def test_each_key_has_its_own_request_budget() -> None:
    limiter = RateLimiter(Settings(key_request_limit="2/minute"))
    limiter.charge(ALICE, requests=1)
    limiter.charge(ALICE, requests=1)
    denied = refused(limiter, ALICE, requests=1)
    assert denied.status_code == 429 and "MT_KEY_REQUEST_LIMIT" in str(denied)
    assert 1 <= int(denied.headers["Retry-After"]) <= 60
    limiter.charge(BOB, requests=1)  # another key is not held back by Alice's requests
    limiter.charge(Caller(None, "10.0.0.1"), requests=1)  # no key (keys off): per-key limits do not apply


def test_the_address_limit_is_shared_by_every_key_from_that_address() -> None:
    limiter = RateLimiter(Settings(address_request_limit="2/minute"))
    limiter.charge(ALICE, requests=1)
    limiter.charge(BOB_AT_ALICES, requests=1)
    assert refused(limiter, ALICE, requests=1).status_code == 429
    limiter.charge(BOB, requests=1)


def test_characters_are_counted_and_a_refused_request_costs_nothing() -> None:
    limiter = RateLimiter(Settings(key_char_limit="100/minute", key_request_limit="3/minute"))
    limiter.charge(ALICE, requests=1)
    limiter.charge(ALICE, chars=60)
    limiter.charge(ALICE, requests=1)
    assert refused(limiter, ALICE, chars=41).status_code == 429  # 60 + 41 > 100
    limiter.charge(ALICE, chars=40)  # the refused 41 were not counted
    limiter.charge(ALICE, requests=1)  # nor did the refusals take requests
    assert refused(limiter, ALICE, requests=1).status_code == 429


def test_more_characters_than_a_whole_window_allows_is_413_not_429() -> None:
    limiter = RateLimiter(Settings(address_char_limit="50/minute"))
    denied = refused(limiter, ALICE, chars=51)
    assert denied.status_code == 413 and "MT_ADDRESS_CHAR_LIMIT" in str(denied) and "Retry-After" not in denied.headers


def test_a_limit_that_cannot_be_read_names_the_setting() -> None:
    with pytest.raises(BadLimit, match="MT_KEY_REQUEST_LIMIT='lots' is not a rate limit"):
        RateLimiter(Settings(key_request_limit="lots"))


def test_429_with_retry_after_then_200_once_it_has_passed(served_model_dir: Path, tmp_path: Path) -> None:
    settings = Settings(
        models=[served_model_dir],
        threads=1,
        api_keys_file=write_keys(tmp_path / "keys.txt"),
        key_request_limit="2 per 1 second",  # a one-second window: the test waits out a real Retry-After
    )
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        post = lambda: client.post("/v1/translate", json={"text": "w01 w02"}, headers=bearer(PLAIN_KEY))  # noqa: E731
        first, second, third = post(), post(), post()
        assert [first.status_code, second.status_code] == [200, 200]
        assert third.status_code == 429, third.text
        retry_after = int(third.headers["retry-after"])
        assert retry_after == 1 and "retry after 1 s" in third.json()["detail"]
        assert client.get("/health/ready").status_code == 200  # health is never limited
        time.sleep(retry_after)  # what a client does with Retry-After; the window has ended by then
        again = post()
        assert again.status_code == 200 and again.json()["translations"] == [{"text": "w01 w02"}]


def test_concurrent_threads_never_overdraw_a_limit() -> None:
    """FastAPI may run a dependency in worker threads: check and count must be one step. Switching threads
    every microsecond makes an unlocked limiter overdraw in about half of these trials."""

    def trial() -> int:
        limiter = RateLimiter(Settings(key_request_limit="100/minute"))
        start = threading.Barrier(8)
        granted = []

        def hammer() -> None:
            start.wait()
            for _ in range(50):
                try:
                    limiter.charge(ALICE, requests=1)
                    granted.append(1)
                except AccessDenied:
                    pass

        threads = [threading.Thread(target=hammer) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return len(granted)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        assert [trial() for _ in range(6)] == [100] * 6
    finally:
        sys.setswitchinterval(interval)
