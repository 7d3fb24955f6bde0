"""Debian's Chromium driven by Playwright: where it lives, the flags it needs here, and how to launch it."""

from __future__ import annotations

from pathlib import Path

from playwright.sync_api import Browser, Playwright

CHROMIUM = Path("/usr/bin/chromium")
INSTALL_HINT = "install Debian's Chromium with `apt-get install -y chromium` (Playwright's own download is not used)"
# No sandbox (root in a container), no GPU, and nothing that reaches outside the machine.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def launch(playwright: Playwright) -> Browser:
    """The system Chromium; raises with the install command when it is missing."""
    if not CHROMIUM.exists():
        raise FileNotFoundError(f"{CHROMIUM} not found: {INSTALL_HINT}")
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
