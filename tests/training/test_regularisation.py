"""The dropout options the small-data recipe uses are each wired into the network, in training mode only."""

from __future__ import annotations

import pytest
import torch

from model.config import preset
from model.transformer import Transformer, dropout

OFF = {"dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0}


def two_training_passes(**dropouts: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = Transformer(preset("tiny", 50, **{**OFF, **dropouts}))
    src = torch.randint(4, 50, (3, 7))
    src_mask = torch.zeros(3, 7, dtype=torch.bool)
    tgt = torch.randint(4, 50, (3, 5))
    model.train()
    first, second = model(src, src_mask, tgt), model(src, src_mask, tgt)
    model.eval()
    return first, second, model(src, src_mask, tgt)


@pytest.mark.parametrize("name", ["dropout", "attention_dropout", "activation_dropout"])
def test_each_dropout_changes_training_passes_only(name: str) -> None:
    first, second, evaluated = two_training_passes(**{name: 0.3})
    assert not torch.allclose(first, second)
    _, _, reference = two_training_passes()
    assert torch.allclose(evaluated, reference, atol=1e-6)  # the same weights: eval mode drops nothing


def test_no_dropout_gives_identical_training_passes() -> None:
    first, second, evaluated = two_training_passes()
    assert torch.equal(first, second) and torch.allclose(first, evaluated, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_dropout_keeps_1_minus_p_scaled_and_passes_the_same_mask_back(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    x = torch.ones(200_000, dtype=dtype, requires_grad=True)
    y = dropout(x, 0.3, training=True)
    kept = y != 0
    assert y.dtype == dtype and abs(kept.float().mean().item() - 0.7) < 0.005
    assert torch.equal(y[kept], torch.full_like(y[kept], 1 / 0.7))  # 1 / (1 - p), in the input's dtype
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # d(x * scale)/dx = scale: the same elements dropped
    assert dropout(x, 0.3, training=False) is x and dropout(x, 0.0, training=True) is x
