"""Turn a finished run into a model directory: average the last K checkpoints, pick by validation BLEU.

The paper averages the last 5 checkpoints; on small data the best single checkpoint can beat the
average, so both are scored on the validation set and the better one is written, with the choice
recorded in ``model.json``.
"""

from __future__ import annotations

import logging
import os
import platform
from pathlib import Path
from typing import Any

from model.model_dir import write_model_json
from model.transformer import Transformer
from model.weights import save_weights
from training.checkpoint import average_state_dicts, load_checkpoint, step_checkpoints
from training.metrics import plot_curves
from training.trainer import Trainer

log = logging.getLogger(__name__)


def finalize(trainer: Trainer) -> Path:
    """Write ``weights.safetensors`` and ``model.json`` (with validation scores) next to ``spm.model``."""
    cfg, out = trainer.cfg, trainer.out
    candidates: dict[str, dict[str, Any]] = {}
    ckpts = [path for _, path in step_checkpoints(trainer.ckpt_dir)][-max(cfg.train.average_last, 1) :]
    if len(ckpts) > 1:
        candidates[f"average of last {len(ckpts)}"] = average_state_dicts(ckpts)
    best = trainer.ckpt_dir / "best.pt"
    candidates[f"best (step {trainer.progress.best_step})"] = load_checkpoint(best if best.exists() else ckpts[-1])[
        "model"
    ]
    model = Transformer(trainer.model_config).to(trainer.device)
    scored = []
    for name, state in candidates.items():
        model.load_state_dict(state)
        result = trainer.validate(model)
        log.info("%s: valid BLEU %.2f chrF %.2f", name, result["bleu"], result["chrf"])
        scored.append((result["bleu"], name, state, result))
    bleu, chosen, state, result = max(scored, key=lambda item: item[0])
    model.load_state_dict(state)
    save_weights(model, out / "weights.safetensors")
    e = cfg.eval
    write_model_json(
        out,
        trainer.model_config,
        cfg.data.src,
        cfg.data.tgt,
        decoding={"beam_size": e.beam_size, "length_penalty": e.length_penalty, "max_length_offset": 50},
        training={**trainer.summary(), "weights": chosen, "machine": f"{platform.machine()} ({os.cpu_count()} cpus)"},
        eval={"valid": {"split": cfg.data.valid, **result}},
        candidates={name: {"bleu": r["bleu"], "chrf": r["chrf"]} for _, name, _, r in scored},
    )
    try:
        plot_curves(out / "metrics.jsonl", out / "training_curves.png")
    except (ValueError, KeyError) as error:  # a run too short to plot is still a model
        log.warning("no training curve plot: %s", error)
    log.info("wrote %s (%s, valid BLEU %.2f)", out, chosen, bleu)
    return out
