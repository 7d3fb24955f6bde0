"""Evaluation during and after training: beam-search translation with the torch model, BLEU/chrF, val loss."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import sacrebleu
import torch

from model.search import SearchConfig, beam_search
from model.tokenizer import Tokenizer, pad_sources
from model.torch_step import TorchStepFunction
from model.transformer import Transformer
from training.loss import label_smoothed_nll_loss


def translate_ids(
    model: Transformer, sources: Sequence[list[int]], search: SearchConfig, batch_size: int = 64
) -> list[list[int]]:
    """Best hypothesis for each source (input order); batches are formed from length-sorted sources."""
    cfg = model.config
    max_src = cfg.max_positions - 1 - search.max_length_offset
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    out: list[list[int]] = [[] for _ in sources]
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        src_ids, src_mask = pad_sources([list(sources[i]) for i in chunk], max_len=max_src)
        step_fn = TorchStepFunction(model, src_ids, src_mask)
        lengths = (~src_mask).sum(axis=1)
        results = beam_search(step_fn, lengths, bos_id=cfg.bos_id, eos_id=cfg.eos_id, config=search)
        for i, hyps in zip(chunk, results, strict=True):
            out[i] = hyps[0].tokens
    return out


def translate_texts(
    model: Transformer, tokenizer: Tokenizer, texts: Sequence[str], search: SearchConfig, batch_size: int = 64
) -> list[str]:
    ids = translate_ids(model, tokenizer.encode_batch(list(texts)), replace(search, n_best=1), batch_size)
    return tokenizer.decode_batch(ids)


def score_translations(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    """sacreBLEU BLEU and chrF with their signatures (cased, detokenized, 13a: the default)."""
    bleu = sacrebleu.metrics.BLEU()
    chrf = sacrebleu.metrics.CHRF()
    refs = [list(references)]
    b = bleu.corpus_score(list(hypotheses), refs)
    c = chrf.corpus_score(list(hypotheses), refs)
    return {
        "bleu": round(b.score, 2),
        "chrf": round(c.score, 2),
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
    }


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
