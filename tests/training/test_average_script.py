"""scripts/average_checkpoints.py: chosen checkpoints of a run averaged into a new, servable model dir."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from helpers import COPY_TASK, make_parallel, toy_pairs
from safetensors.torch import load_file

from training.checkpoint import load_checkpoint, step_checkpoints

SCRIPT = Path(__file__).parents[2] / "scripts" / "average_checkpoints.py"


def load_script():
    spec = importlib.util.spec_from_file_location("average_checkpoints", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_averaged_weights_are_the_mean_and_the_model_dir_is_scored(trained_model_dir: Path, tmp_path: Path) -> None:
    script = load_script()
    ckpts = [path for _, path in step_checkpoints(trained_model_dir / "checkpoints")][-2:]
    assert len(ckpts) == 2, "the toy run keeps several checkpoints"
    valid = make_parallel(tmp_path, toy_pairs(20, "copy", seed=5, **COPY_TASK), split="valid")
    out = tmp_path / "avg"
    argv = [*map(str, ckpts), "--model-dir", str(trained_model_dir), "--out", str(out)]
    assert script.main([*argv, "--valid-src", str(valid[0]), "--valid-ref", str(valid[1])]) == 0

    weights = load_file(str(out / "weights.safetensors"))
    first, second = (load_checkpoint(path)["model"] for path in ckpts)
    assert set(weights) == set(first)
    for name, value in weights.items():
        mean = (first[name].double() + second[name].double()) / 2
        torch.testing.assert_close(value.double(), mean, rtol=0, atol=1e-6, msg=name)
    assert any(not torch.equal(first[name], second[name]) for name in first), "two distinct checkpoints"

    meta = json.loads((out / "model.json").read_text())
    source = json.loads((trained_model_dir / "model.json").read_text())
    assert meta["model"] == source["model"] and meta["decoding"] == source["decoding"]
    assert meta["training"]["weights"] == f"average of 2: {ckpts[0].name}, {ckpts[1].name}"
    assert "candidates" not in meta
    # The toy copy task is learned: the averaged model copies its validation sentences.
    assert meta["eval"]["valid"]["bleu"] > 90
    assert (out / "spm.model").read_bytes() == (trained_model_dir / "spm.model").read_bytes()


def test_refuses_an_existing_output_and_a_missing_checkpoint(trained_model_dir: Path, tmp_path: Path) -> None:
    script = load_script()
    ckpt = str(next(iter(step_checkpoints(trained_model_dir / "checkpoints")))[1])
    with pytest.raises(SystemExit):
        script.main([ckpt, "--model-dir", str(trained_model_dir), "--out", str(tmp_path)])  # exists
    with pytest.raises(SystemExit):
        script.main([str(tmp_path / "nope.pt"), "--model-dir", str(trained_model_dir), "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()
