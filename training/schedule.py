"""The paper's learning-rate schedule (linear warmup, then inverse square root decay, section 5.3), with an
optional linear cooldown to zero over a run's last steps."""

from __future__ import annotations


def noam_lr(step: int, d_model: int, warmup_steps: int, scale: float = 1.0) -> float:
    """lrate = scale * d_model^-0.5 * min(step^-0.5, step * warmup_steps^-1.5), for step >= 1."""
    step = max(step, 1)
    return scale * d_model**-0.5 * min(step**-0.5, step * warmup_steps**-1.5)


def cooldown_factor(step: int, max_steps: int, cooldown: float) -> float:
    """1 until the last ``cooldown`` fraction of a ``max_steps`` run (K = round(cooldown * max_steps) steps),
    then linear down to ``1 / K`` at ``max_steps`` (0 = no cooldown).

    The inverse square root never gets small within a short run (2.1e-4 at the end of the bundled model's
    first 12,000 steps), so its last checkpoints still move by ±0.5 val BLEU and averaging them did not help;
    a final linear decay (the "decay" of warmup-stable-decay schedules) settles them. The factor depends
    only on the step, so a run resumed with it follows the same path as one started with it.
    """
    steps = round(cooldown * max_steps)
    if steps <= 0:
        return 1.0
    return min(1.0, (max_steps - step + 1) / steps)
