"""Fixtures for service tests: the trained copy model exported once, a second model for routing, and real
``mt-serve`` processes on free loopback ports."""

from __future__ import annotations

import json
import shutil
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# The helper modules next to this file (live_server, fault_server) are imported by the tests.
sys.path.insert(0, str(Path(__file__).parent))

from live_server import FAULT_ENV, FAULT_SERVER, Server, start_server


@pytest.fixture(scope="session")
def reverse_model_dir(served_model_dir: Path) -> Path:
    """The same network declared as tgt→src under another name: a second model to route to."""
    model_dir = served_model_dir.parent / "copy-model-back"
    shutil.copytree(served_model_dir, model_dir)
    meta_path = model_dir / "model.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    meta["source_lang"], meta["target_lang"] = "tgt", "src"
    meta_path.write_text(json.dumps(meta), encoding="utf-8")
    return model_dir


@pytest.fixture(scope="session")
def copy_sources(copy_task_dir: Path) -> list[str]:
    """Held-out copy-task sentences, which the model copies exactly."""
    return (copy_task_dir / "test.src").read_text(encoding="utf-8").splitlines()


@pytest.fixture(scope="session")
def server(
    served_model_dir: Path, reverse_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """``mt-serve`` serving src→tgt and tgt→src in a real uvicorn process."""
    log = tmp_path_factory.mktemp("logs") / "server.log"
    running = start_server(["-m", "service.cli"], [served_model_dir, reverse_model_dir], log)
    yield running
    assert running.stop() in (0, -signal.SIGTERM), running.log_tail()


@pytest.fixture(scope="session")
def fault_server(served_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A real server whose engine fails on FAULT_TEXT and stalls on SLOW_TEXT (see fault_server.py)."""
    log = tmp_path_factory.mktemp("logs") / "fault_server.log"
    running = start_server(FAULT_SERVER, [served_model_dir], log, **FAULT_ENV)
    yield running
    running.stop()
