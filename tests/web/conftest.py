"""Fixtures for the demo page tests: a real ``mt-serve`` with the copy model, and headless Chromium pages."""

from __future__ import annotations

import json
import shutil
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from export.cli import main as mt_export

# headless.py here; live_server.py (start a real server on a free port) is shared with the service tests.
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "service"))

from headless import launch
from live_server import Server, start_server

WAIT_MS = 20_000  # page assertions wait this long: a translation on a busy 2-core machine can take seconds


@pytest.fixture(scope="session")
def web_models(trained_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The trained copy model (src→tgt) with ONNX graphs, and the same network declared de→en, so the
    pickers have two pairs to offer, one of them in languages with names."""
    root = tmp_path_factory.mktemp("web")
    forward = root / "copy-model"
    shutil.copytree(trained_model_dir, forward, ignore=shutil.ignore_patterns("onnx", "checkpoints", "*.png"))
    assert mt_export([str(forward), "--quiet"]) == 0
    back = root / "copy-model-back"
    shutil.copytree(forward, back)
    meta = json.loads((back / "model.json").read_text(encoding="utf-8"))
    meta["source_lang"], meta["target_lang"] = "de", "en"
    (back / "model.json").write_text(json.dumps(meta), encoding="utf-8")
    return [forward, back]


@pytest.fixture(scope="session")
def max_chars() -> int:
    """The server's MT_MAX_CHARS: low, so that a test can type a text over it."""
    return 200


@pytest.fixture(scope="session")
def max_attention_cells() -> int:
    """The server's MT_MAX_ATTENTION_CELLS: low, so that a text under MT_MAX_CHARS can be over it."""
    return 1000


@pytest.fixture(scope="session")
def web_server(
    web_models: list[Path], max_chars: int, max_attention_cells: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("logs") / "web_server.log"
    env = {"MT_MAX_CHARS": str(max_chars), "MT_MAX_ATTENTION_CELLS": str(max_attention_cells)}
    running = start_server(["-m", "service.cli"], web_models, log, **env)
    yield running
    assert running.stop() in (0, -signal.SIGTERM), running.log_tail()


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = launch(playwright)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser, web_server: Server) -> Iterator[Page]:
    """A fresh page on the demo, its pickers filled; fails the test on any script error or request that
    leaves the server (the page must work with no network beyond it)."""
    expect.set_options(timeout=WAIT_MS)
    context = browser.new_context(base_url=web_server.url, viewport={"width": 1000, "height": 800})
    page = context.new_page()
    script_errors: list[str] = []
    outside: list[str] = []
    page.on("pageerror", lambda error: script_errors.append(str(error)))
    page.on("request", lambda r: None if r.url.startswith(web_server.url) else outside.append(r.url))
    page.goto("/")
    expect(page.locator("#translate")).to_be_enabled()
    yield page
    context.close()
    assert not script_errors, script_errors
    assert not outside, f"requests outside the server: {outside}"
