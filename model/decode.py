"""Translate token ids with any step function (torch or onnxruntime) and score text with sacreBLEU (no torch).

Training-time BLEU, the export's parity and BLEU checks, and the batch client share these, so every BLEU
the project reports comes from the same decoding rules and the same metric settings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from model.config import ModelConfig
from model.decoding import PAPER, DecodingOptions
from model.search import Hypothesis, StepFunction, beam_search
from model.tokenizer import pad_sources

# (src_ids (B, S), src_pad_mask (B, S)) → a step function holding that batch's encoder output and cache
StepFactory = Callable[[np.ndarray, np.ndarray], StepFunction]


def search_batch(
    step_fn: StepFunction, src_lengths: Sequence[int], config: ModelConfig, search: DecodingOptions
) -> list[list[Hypothesis]]:
    """Beam search with the network's special ids and position limit (``src_lengths`` without EOS)."""
    return beam_search(
        step_fn,
        np.asarray(src_lengths, dtype=np.int64),
        bos_id=config.bos_id,
        eos_id=config.eos_id,
        pad_id=config.pad_id,
        max_positions=config.max_positions,
        config=search,
    )


def translate_ids(
    make_step: StepFactory,
    sources: Sequence[list[int]],
    config: ModelConfig,
    search: DecodingOptions = PAPER,
    batch_size: int = 32,
) -> list[list[int]]:
    """The best hypothesis of each source, in input order; batches are formed from length-sorted sources.

    A source longer than the position table (with its EOS) is cut to fit, as the service does.
    """
    search = replace(search, n_best=1)
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    out: list[list[int]] = [[] for _ in sources]
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        src_ids, src_mask = pad_sources(
            [list(sources[i]) for i in chunk], config.max_positions, config.pad_id, config.eos_id
        )
        lengths = (~src_mask).sum(axis=1) - 1  # without the EOS
        for i, hyps in zip(chunk, search_batch(make_step(src_ids, src_mask), lengths, config, search), strict=True):
            out[i] = hyps[0].tokens
    return out


def score_translations(hypotheses: Sequence[str], references: Sequence[str], target_lang: str = "") -> dict[str, Any]:
    """sacreBLEU corpus BLEU and chrF with their signatures (cased, detokenized, 13a: the defaults)."""
    from sacrebleu.metrics import BLEU, CHRF  # in the serve/train/export extras, not the core

    bleu, chrf = BLEU(trg_lang=target_lang), CHRF()
    refs = [list(references)]
    b, c = bleu.corpus_score(list(hypotheses), refs), chrf.corpus_score(list(hypotheses), refs)
    return {
        "bleu": round(b.score, 2),
        "chrf": round(c.score, 2),
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
    }
