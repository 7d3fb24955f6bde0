"""Pieces of a finished run's model dir: the candidate weights (average of the last K, best) and the files.

The paper averages the last 5 checkpoints; on small data the best single checkpoint can beat the average,
so ``Trainer.finalize`` scores both on the validation set and writes the better one, recording the choice.
"""

from __future__ import annotations

import logging
import os
import platform
from pathlib import Path
from typing import Any

import torch

from model.model_dir import write_model_json
from model.transformer import Transformer
from model.weights import save_weights
from training.checkpoint import average_state_dicts, load_checkpoint, step_checkpoints
from training.config import TrainConfig
from training.metrics import plot_curves

log = logging.getLogger(__name__)


def candidate_weights(ckpt_dir: Path, average_last: int, best_step: int) -> dict[str, dict[str, torch.Tensor]]:
    """``{name: state dict}``: the average of the last ``average_last`` step checkpoints (when there are
    two or more) and the best one (``best.pt``, else the last checkpoint)."""
    ckpts = [path for _, path in step_checkpoints(ckpt_dir)][-max(average_last, 1) :]
    candidates: dict[str, dict[str, torch.Tensor]] = {}
    if len(ckpts) > 1:
        candidates[f"average of last {len(ckpts)}"] = average_state_dicts(ckpts)
    best = ckpt_dir / "best.pt"
    candidates[f"best (step {best_step})"] = load_checkpoint(best if best.exists() else ckpts[-1])["model"]
    return candidates


def write_model_dir(
    out: Path,
    model: Transformer,
    cfg: TrainConfig,
    summary: dict[str, Any],
    chosen: str,
    result: dict[str, Any],
    candidates: dict[str, dict[str, float]],
) -> Path:
    """``weights.safetensors``, ``model.json`` (config, languages, decoding, training summary, validation
    scores of every candidate) and the training curves next to ``spm.model``."""
    save_weights(model, out / "weights.safetensors")
    e = cfg.eval
    write_model_json(
        out,
        model.config,
        cfg.data.src,
        cfg.data.tgt,
        decoding={"beam_size": e.beam_size, "length_penalty": e.length_penalty, "max_length_offset": 50},
        training={**summary, "weights": chosen, "machine": f"{platform.machine()} ({os.cpu_count()} cpus)"},
        eval={"valid": {"split": cfg.data.valid, **result}},
        candidates=candidates,
    )
    try:
        plot_curves(out / "metrics.jsonl", out / "training_curves.png")
    except (ValueError, KeyError) as error:  # a run too short to plot is still a model
        log.warning("no training curve plot: %s", error)
    log.info("wrote %s (%s, valid BLEU %.2f)", out, chosen, result["bleu"])
    return out
