"""Label-smoothed cross entropy (section 5.4), summed over non-padding target tokens."""

from __future__ import annotations

import torch
from torch import Tensor


def label_smoothed_nll_loss(logits: Tensor, target: Tensor, epsilon: float, pad_id: int) -> tuple[Tensor, Tensor]:
    """logits (B, T, V), target (B, T) → (smoothed loss sum, nll sum), both over non-pad tokens.

    The smoothed target puts 1 - epsilon on the gold token and spreads epsilon uniformly over the
    vocabulary (fairseq's form); the nll sum is reported alongside for perplexity.
    """
    lprobs = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    keep = target.ne(pad_id)
    nll = -lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # (B, T)
    smooth = -lprobs.mean(dim=-1)  # (B, T): expected -log p under the uniform distribution
    loss = (1.0 - epsilon) * nll + epsilon * smooth
    return loss[keep].sum(), nll[keep].sum()
