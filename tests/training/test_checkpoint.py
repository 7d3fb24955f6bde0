"""Checkpoints load with torch's weights-only unpickler: a crafted file cannot run code on --resume."""

from __future__ import annotations

import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from training.checkpoint import load_checkpoint, save_checkpoint


class _RunsCode:
    """Unpickling this calls Path.write_text: what a crafted checkpoint would do with os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def test_a_crafted_checkpoint_is_refused_without_running_its_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "step_0000010.pt"
    save_checkpoint({"model": {"w": torch.zeros(2)}, "payload": _RunsCode(marker)}, path)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_checkpoint(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the check above is meaningful: a full unpickle does run it
    assert marker.read_text() == "code ran"


def test_rng_states_and_tensors_round_trip_exactly(tmp_path: Path) -> None:
    random.seed(3)
    np.random.seed(3)
    state = {
        "model": {"w": torch.randn(3, 4)},
        "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
        "progress": {"step": 7, "epoch": 1, "train_seconds": 1.5},
    }
    path = tmp_path / "ckpt.pt"
    save_checkpoint(state, path)
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])
    assert loaded["rng"]["python"] == state["rng"]["python"]
    name, keys, pos, has_gauss, cached = loaded["rng"]["numpy"]
    assert name == "MT19937" and keys.dtype == np.uint32
    np.testing.assert_array_equal(keys, state["rng"]["numpy"][1])
    assert (pos, has_gauss, cached) == tuple(state["rng"]["numpy"][2:])
    assert torch.equal(loaded["rng"]["torch"], state["rng"]["torch"])
    assert loaded["progress"] == state["progress"]
