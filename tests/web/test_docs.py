"""/docs (Swagger UI) and /redoc render in headless Chromium with no network beyond the server: their scripts and
styles come from the app itself, and the operations they list are the ones in /openapi.json."""

from __future__ import annotations

import httpx
import pytest
from headless import CHROMIUM, INSTALL_HINT
from live_server import Server
from playwright.sync_api import Browser, Route, expect

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no {CHROMIUM}: {INSTALL_HINT}")


def offline_page(browser: Browser, server: Server):
    """A page whose requests to anywhere but the server fail, as they would on a machine without internet."""
    context = browser.new_context(base_url=server.url)
    page = context.new_page()
    outside: list[str] = []

    def block(route: Route) -> None:
        outside.append(route.request.url)
        route.abort("internetdisconnected")

    page.route(lambda url: not url.startswith(server.url), block)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    return context, page, outside, errors


def test_swagger_ui_renders_offline(browser: Browser, web_server: Server) -> None:
    context, page, outside, errors = offline_page(browser, web_server)
    page.goto("/docs")
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("Transformer translation service")
    spec = httpx.get(f"{web_server.url}/openapi.json").json()
    expected = sorted((method.upper(), path) for path, item in spec["paths"].items() for method in item)
    operations = page.locator(".opblock")
    expect(operations).to_have_count(len(expected))
    shown = sorted(
        (
            block.locator(".opblock-summary-method").inner_text().strip(),
            block.locator(".opblock-summary-path").get_attribute("data-path"),
        )
        for block in operations.all()
    )
    assert shown == expected
    assert ("POST", "/translate") in expected and ("POST", "/v1/translate") in expected
    # Opening an operation shows its request body example, rendered by Swagger UI's own scripts.
    page.locator(".opblock-summary-path", has_text="/v1/translate").first.click()
    expect(page.locator(".opblock-body").first).to_contain_text("Ein Mann fährt Fahrrad.")
    context.close()
    assert not outside, f"/docs asked the network for {outside}"
    assert not errors, errors


def test_redoc_renders_offline(browser: Browser, web_server: Server) -> None:
    context, page, outside, errors = offline_page(browser, web_server)
    page.goto("/redoc")
    expect(page.locator("h1").first).to_contain_text("Transformer translation service")
    expect(page.get_by_text("Translate (LibreTranslate-compatible)").first).to_be_attached()
    context.close()
    # Only ReDoc's "powered by" logo lives on its CDN: without it the page is whole.
    assert set(outside) <= {"https://cdn.redoc.ly/redoc/logo-mini.svg"}, f"/redoc asked the network for {outside}"
    assert not errors, errors
