"""Fixtures for export tests: the trained tiny copy model, exported once through mt-export."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from export.cli import main as mt_export

VALID_SENTENCES = 40  # --max-sentences of the session's export: enough for BLEU, quick on a CPU


@pytest.fixture(scope="session")
def exported_model_dir(trained_model_dir: Path, copy_task_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of ``trained_model_dir`` after ``mt-export --int8 --fp16`` with the copy task's test split as
    the validation set. A copy, because export writes MODEL_DIR/onnx/ and other suites share the original."""
    model_dir = tmp_path_factory.mktemp("export") / trained_model_dir.name
    shutil.copytree(trained_model_dir, model_dir, ignore=shutil.ignore_patterns("onnx", "checkpoints", "*.png"))
    args = [str(model_dir), "--int8", "--fp16", "--max-sentences", str(VALID_SENTENCES)]
    args += ["--valid-src", str(copy_task_dir / "test.src"), "--valid-ref", str(copy_task_dir / "test.tgt")]
    assert mt_export(args) == 0
    return model_dir


@pytest.fixture(scope="session")
def copy_sources(copy_task_dir: Path) -> list[str]:
    """Held-out copy-task sentences (the test split)."""
    return (copy_task_dir / "test.src").read_text(encoding="utf-8").splitlines()
