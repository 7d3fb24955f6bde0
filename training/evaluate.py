"""Evaluation during and after training: beam-search translation with the torch model, val loss."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch

from model.decode import translate_ids
from model.decoding import DecodingOptions
from model.tokenizer import Tokenizer
from model.torch_step import TorchStepFunction
from model.transformer import Transformer
from training.loss import label_smoothed_nll_loss


def translate_texts(
    model: Transformer, tokenizer: Tokenizer, texts: Sequence[str], search: DecodingOptions, batch_size: int = 64
) -> list[str]:
    """Best beam-search translation of each text with the torch model (input order)."""
    make_step = partial(TorchStepFunction, model)
    ids = translate_ids(make_step, tokenizer.encode_batch(list(texts)), model.config, search, batch_size)
    return tokenizer.decode_batch(ids)


@torch.inference_mode()
def validation_loss(
    model: Transformer, batches: Iterable[Any], device: torch.device, label_smoothing: float = 0.0
) -> dict[str, float]:
    """Per-token loss and perplexity on teacher-forced batches (collated like training batches)."""
    was_training = model.training
    model.eval()
    loss_sum, nll_sum, tokens = 0.0, 0.0, 0
    for batch in batches:
        logits = model(batch.src.to(device), batch.src_pad_mask.to(device), batch.tgt_in.to(device))
        loss, nll = label_smoothed_nll_loss(logits, batch.tgt_out.to(device), label_smoothing, model.config.pad_id)
        loss_sum += loss.item()
        nll_sum += nll.item()
        tokens += int(batch.tgt_out.ne(model.config.pad_id).sum())
    model.train(was_training)
    nll_per_token = nll_sum / max(tokens, 1)
    return {"loss": loss_sum / max(tokens, 1), "nll": nll_per_token, "ppl": float(np.exp(min(nll_per_token, 50)))}
