"""Shared fixtures: tiny corpora, toy copy/reverse tasks, and a tiny model trained by mt-train."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

# Tiny models gain nothing from intra-op threads, and spinning OpenMP workers on a busy 2-core machine
# make every op wait: one thread per process, inherited by the mt-train/mt-serve subprocesses too.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from helpers import COPY_TASK, copy_task_overrides, make_parallel, toy_overrides, toy_pairs


@pytest.fixture(name="make_parallel")
def make_parallel_fixture() -> Callable[..., list[Path]]:
    return make_parallel


@pytest.fixture(name="toy_pairs")
def toy_pairs_fixture() -> Callable[..., list[tuple[str, str]]]:
    return toy_pairs


@pytest.fixture(name="toy_overrides")
def toy_overrides_fixture() -> Callable[[Path, Path], list[str]]:
    return toy_overrides


@pytest.fixture
def toy_data_dir(tmp_path: Path) -> Path:
    """A data dir with a reverse task: 200 train pairs, 20 valid pairs, languages ``src``/``tgt``."""
    make_parallel(tmp_path, toy_pairs(200, "reverse", seed=0), split="train")
    make_parallel(tmp_path, toy_pairs(20, "reverse", seed=1), split="valid")
    return tmp_path


@pytest.fixture(scope="session")
def copy_task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2,000 train and 50 valid copy-task pairs (languages ``src``/``tgt``) plus 100 held-out ``test`` pairs."""
    root = tmp_path_factory.mktemp("copy_task")
    make_parallel(root, toy_pairs(2000, "copy", seed=0, **COPY_TASK), split="train")
    make_parallel(root, toy_pairs(50, "copy", seed=1, **COPY_TASK), split="valid")
    make_parallel(root, toy_pairs(100, "copy", seed=2, **COPY_TASK), split="test")
    return root


@pytest.fixture(scope="session")
def trained_model_dir(tmp_path_factory: pytest.TempPathFactory, copy_task_dir: Path) -> Path:
    """A model directory written by ``mt-train`` (a real subprocess) for the copy task."""
    out = tmp_path_factory.mktemp("trained") / "copy-model"
    overrides = [arg for item in copy_task_overrides(copy_task_dir, out) for arg in ("--set", item)]
    config = Path(__file__).parents[1] / "training" / "configs" / "multi30k_de_en.yaml"
    result = subprocess.run(
        [sys.executable, "-m", "training.cli", "--config", str(config), *overrides],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def served_model_dir(trained_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the trained copy-task model (src→tgt) with its fp32 ONNX graphs from ``mt-export``."""
    from export.cli import main as mt_export  # torch and onnx load only for the tests that need a served model

    model_dir = tmp_path_factory.mktemp("service") / "copy-model"
    shutil.copytree(trained_model_dir, model_dir, ignore=shutil.ignore_patterns("onnx", "checkpoints", "*.png"))
    assert mt_export([str(model_dir), "--quiet"]) == 0
    return model_dir
