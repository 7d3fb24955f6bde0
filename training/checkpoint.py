"""Training checkpoints: atomic writes, keep the best and the last K, average the last K, RNG states."""

from __future__ import annotations

import logging
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

try:  # numpy >= 2
    from numpy._core import multiarray as np_multiarray
except ImportError:  # numpy 1.x
    from numpy.core import multiarray as np_multiarray

log = logging.getLogger(__name__)
STEP_FILE = re.compile(r"^step_(\d+)\.pt$")


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """torch.save to a temporary file, fsync, then rename: a kill mid-write never leaves a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def step_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """``step_*.pt`` files in step order."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := STEP_FILE.match(p.name))]
    return sorted(found)


def latest_checkpoint(directory: Path) -> Path | None:
    ckpts = step_checkpoints(directory)
    return ckpts[-1][1] if ckpts else None


def prune_checkpoints(directory: Path, keep_last: int) -> None:
    """Delete all but the last ``keep_last`` step checkpoints (``best.pt`` is a separate file)."""
    for _, path in step_checkpoints(directory)[:-keep_last]:
        path.unlink(missing_ok=True)


# What a checkpoint holds besides tensors and plain containers: numpy's RNG state (a uint32 array). These
# rebuild an array from its dtype and bytes; nothing else a pickle could name is allowed to load.
NUMPY_RNG_GLOBALS = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), np_multiarray._reconstruct]


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint read with torch's weights-only unpickler: tensors, plain containers and numpy's RNG state
    only, so a crafted file cannot run code on ``--resume`` (it fails with an UnpicklingError instead)."""
    with torch.serialization.safe_globals(NUMPY_RNG_GLOBALS):
        return torch.load(path, map_location="cpu", weights_only=True)


def average_state_dicts(paths: list[Path]) -> dict[str, torch.Tensor]:
    """Element-wise mean of the model weights of several checkpoints (the paper averages the last 5)."""
    if not paths:
        raise ValueError("no checkpoints to average")
    total: dict[str, torch.Tensor] = {}
    for path in paths:
        state = load_checkpoint(path)["model"]
        for key, value in state.items():
            value = value.detach().to(torch.float64)
            total[key] = total[key] + value if key in total else value.clone()
    log.info("averaged %d checkpoints: %s", len(paths), ", ".join(p.name for p in paths))
    return {key: (value / len(paths)).to(torch.float32) for key, value in total.items()}


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
