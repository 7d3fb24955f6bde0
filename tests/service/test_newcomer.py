"""The newcomer's traps in serving: unknown MT_ variables, --version and --help, CORS off unless asked for."""

from __future__ import annotations

import importlib.metadata
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings, unknown_variables


def test_unknown_mt_variables_are_named_with_the_setting_meant() -> None:
    environ = {"MT_MODEL": "x", "MT_MAX_CHAR": "5", "MT_THREADS": "1", "MT_REPLICAS": "4", "MT_FOO": "1", "HOME": "/"}
    assert unknown_variables(environ) == [("MT_FOO", None), ("MT_MAX_CHAR", "MT_MAX_CHARS"), ("MT_MODEL", "MT_MODELS")]


def test_the_app_warns_about_them(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("MT_MODEL", "models/other")
    with caplog.at_level(logging.WARNING):
        create_app(Settings())
    assert "MT_MODEL is not a setting and is ignored; did you mean MT_MODELS?" in caplog.text


@pytest.mark.parametrize(
    ("script", "name"),
    [
        ("service.cli", "mt-serve"),
        ("service.client", "mt-translate"),
        ("training.cli", "mt-train"),
        ("export.cli", "mt-export"),
    ],
)
def test_version(script: str, name: str) -> None:
    result = subprocess.run([sys.executable, "-m", script, "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert result.stdout.strip() == f"{name} {importlib.metadata.version('mt-service')}"


def test_serve_help_lists_every_setting() -> None:
    result = subprocess.run([sys.executable, "-m", "service.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for name in Settings.model_fields:
        assert f"  MT_{name.upper()} (default " in result.stdout
    assert "MT_MAX_CHARS (default 10000): characters per text (413 above)" in result.stdout


PREFLIGHT = {"Origin": "moz-extension://abc", "Access-Control-Request-Method": "POST"}


def test_cors_is_off_by_default() -> None:
    client = TestClient(create_app(Settings()))  # no lifespan: no model needed to answer these
    response = client.options("/translate", headers=PREFLIGHT)
    assert "access-control-allow-origin" not in response.headers
    assert "access-control-allow-origin" not in client.get("/health/live", headers=PREFLIGHT).headers


def test_cors_origins_are_allowed_when_configured() -> None:
    client = TestClient(create_app(Settings(cors_origins="moz-extension://abc, https://example.org")))
    response = client.options("/translate", headers=PREFLIGHT)
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "moz-extension://abc"
    other = client.options("/translate", headers={**PREFLIGHT, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    live = client.get("/health/live", headers={"Origin": "https://example.org"})
    assert live.headers["access-control-allow-origin"] == "https://example.org"


def test_make_serve_installs_only_serving_extras_and_takes_several_models() -> None:
    root = Path(__file__).parents[2]
    result = subprocess.run(
        ["make", "-n", "-B", "serve", "MODELS=models/a models/b"], cwd=root, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    installs = [line for line in result.stdout.splitlines() if "pip install" in line and " -e " in line]
    assert installs and all('-e ".[serve,export]"' in line for line in installs), installs
    assert "--model models/a --model models/b" in result.stdout
