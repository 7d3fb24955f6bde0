"""The Dockerfiles: hadolint clean, a torch-free serving stage on the right base, non-root, health-checked."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DOCKERFILES = {"gpu": DOCKER / "Dockerfile", "cpu": DOCKER / "Dockerfile.cpu"}
BASES = {"gpu": r"nvidia/cuda:[\d.]+-cudnn-runtime-ubuntu[\d.]+", "cpu": r"python:3\.11-slim"}
BUNDLED = "models/multi30k-de-en"


def stages(path: Path) -> list[list[str]]:
    """The instructions of each stage (continuation lines joined, comments dropped)."""
    text = re.sub(r"\\\n\s*", " ", path.read_text(encoding="utf-8"))
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    out: list[list[str]] = [[]]
    for line in lines:
        if line.upper().startswith("FROM "):
            out.append([])
        out[-1].append(line)
    return out[1:]


def instructions(stage: list[str], keyword: str) -> list[str]:
    return [line[len(keyword) + 1 :] for line in stage if line.upper().startswith(keyword + " ")]


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_hadolint_clean(hadolint: str, kind: str) -> None:
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILES[kind])], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_serving_stage(kind: str) -> None:
    export, final = stages(DOCKERFILES[kind])
    assert re.fullmatch(BASES[kind], instructions(final, "FROM")[0])
    # The export stage exports the bundled model dir, and only its result reaches the serving stage.
    assert any("mt-export --force --int8 --fp16" in run for run in instructions(export, "RUN"))
    assert f"ARG MODEL={BUNDLED}" in DOCKERFILES[kind].read_text(encoding="utf-8")
    assert any(c.startswith("--from=export /model /app/models/multi30k-de-en") for c in instructions(final, "COPY"))
    # No torch: nothing in the serving stage names it or the extras that bring it.
    final_text = "\n".join(final)
    assert "torch" not in final_text and "train" not in final_text
    assert instructions(final, "USER") == ["10001"]
    assert "useradd --system --uid 10001" in final_text
    assert instructions(final, "ENTRYPOINT") == ['["mt-serve"]']
    (healthcheck,) = instructions(final, "HEALTHCHECK")
    assert healthcheck.endswith('CMD ["python", "/app/docker/healthcheck.py"]')
    env = " ".join(instructions(final, "ENV"))
    assert "MT_HOST=0.0.0.0" in env and f"MT_MODELS=/app/{BUNDLED}" in env


needs_tomllib = pytest.mark.skipif(
    sys.version_info < (3, 11), reason="docker/requirements.py reads pyproject.toml with tomllib (Python 3.11+)"
)


def requirements(*args: str) -> list[str]:
    command = [sys.executable, str(DOCKER / "requirements.py"), *args]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout.split()


@needs_tomllib
@pytest.mark.parametrize(("kind", "args"), [("gpu", ["serve", "gpu", "--without", "onnxruntime"]), ("cpu", ["serve"])])
def test_serving_requirements_have_no_torch(kind: str, args: list[str]) -> None:
    """What the serving stage installs (the same requirements.py call as its Dockerfile)."""
    assert f"python docker/requirements.py {' '.join(args)} > /tmp/requirements.txt" in DOCKERFILES[kind].read_text()
    names = {re.split(r"[\[<>=!~;]", r, maxsplit=1)[0] for r in requirements(*args)}
    assert not names & {"torch", "onnxscript", "safetensors", "matplotlib"}
    assert {"fastapi", "uvicorn", "numpy", "sentencepiece"} <= names
    assert ("onnxruntime-gpu" in names and "onnxruntime" not in names) if kind == "gpu" else "onnxruntime" in names


@needs_tomllib
def test_requirements_refuse_unknown_extra() -> None:
    result = subprocess.run([sys.executable, str(DOCKER / "requirements.py"), "servee"], capture_output=True, text=True)
    assert result.returncode != 0 and "has no extra servee" in result.stderr


def test_dockerignore_lets_every_copy_through() -> None:
    """Every COPY source is whitelisted in .dockerignore (which starts by ignoring everything)."""
    allowed = [
        line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")
    ]
    for path in DOCKERFILES.values():
        for stage in stages(path):
            for copy in instructions(stage, "COPY"):
                if copy.startswith("--from"):
                    continue
                for source in copy.split()[:-1]:
                    source = source.replace("${MODEL}", BUNDLED).rstrip("/")
                    assert any(source == a or source.startswith(a + "/") for a in allowed), f"{path.name}: {source}"
                    if not source.startswith("models/"):  # the bundled model dir may not be in this checkout yet
                        assert (ROOT / source).exists(), f"{path.name} copies {source}, which does not exist"


class Health(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        body = json.dumps({"status": "ready" if self.status == 200 else "loading"}).encode()
        self.send_response(self.status if self.path == "/health/ready" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.mark.parametrize(("status", "code"), [(200, 0), (503, 1), (None, 1)])
def test_healthcheck_script(status: int | None, code: int) -> None:
    """docker/healthcheck.py exits 0 only when /health/ready on MT_PORT answers 200."""
    handler = type("Handler", (Health,), {"status": status or 200})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    port = server.server_address[1]
    if status is None:
        server.server_close()  # nobody listening
    else:
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        command = [sys.executable, str(DOCKER / "healthcheck.py")]
        result = subprocess.run(command, env={"MT_PORT": str(port)}, capture_output=True, timeout=30)
        assert result.returncode == code, result.stderr
    finally:
        if status is not None:
            server.shutdown()
            server.server_close()
