"""Training losses: label-smoothed cross entropy (section 5.4) and R-Drop's consistency term, summed over
non-padding target tokens."""

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


def r_drop_kl(logits_a: Tensor, logits_b: Tensor, target: Tensor, pad_id: int) -> Tensor:
    """R-Drop (Liang et al., 2021): the symmetric KL divergence between two dropout passes over one batch.

    logits (B, T, V) of each pass, target (B, T) for the padding → ``(KL(a||b) + KL(b||a)) / 2`` summed
    over non-pad tokens. Added as ``alpha *`` this to the mean of the two passes' losses.
    """
    lp_a = torch.log_softmax(logits_a.float(), dim=-1)  # (B, T, V)
    lp_b = torch.log_softmax(logits_b.float(), dim=-1)
    per_token = 0.5 * ((lp_a.exp() * (lp_a - lp_b)).sum(-1) + (lp_b.exp() * (lp_b - lp_a)).sum(-1))  # (B, T)
    return per_token[target.ne(pad_id)].sum()
