"""Translate token ids with any step function (torch or onnxruntime), batch by batch, and score with sacreBLEU."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import sacrebleu

from model.config import ModelConfig
from model.search import SearchConfig, StepFunction, beam_search
from model.tokenizer import pad_sources

# (src_ids (B, S), src_pad_mask (B, S)) → a step function holding that batch's encoder output and cache
StepFactory = Callable[[np.ndarray, np.ndarray], StepFunction]
PAPER_SEARCH = SearchConfig()  # beam 4, α 0.6, max length = source + 50


def translate_ids(
    make_step: StepFactory,
    sources: Sequence[list[int]],
    config: ModelConfig,
    search: SearchConfig = PAPER_SEARCH,
    batch_size: int = 32,
) -> list[list[int]]:
    """The best hypothesis of each source, in input order; batches are formed from length-sorted sources.

    Sources are cut to fit the model's positions with the search's length offset, as in training.
    """
    search = replace(search, n_best=1)
    max_src = config.max_positions - 1 - search.max_length_offset
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    out: list[list[int]] = [[] for _ in sources]
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        src_ids, src_mask = pad_sources([list(sources[i]) for i in chunk], max_len=max_src)
        lengths = (~src_mask).sum(axis=1)
        results = beam_search(
            make_step(src_ids, src_mask), lengths, bos_id=config.bos_id, eos_id=config.eos_id, config=search
        )
        for i, hyps in zip(chunk, results, strict=True):
            out[i] = hyps[0].tokens
    return out


def read_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> tuple[float, str]:
    """sacreBLEU corpus BLEU (defaults: 13a tokenisation, cased) and its signature."""
    bleu = sacrebleu.metrics.BLEU()
    score = bleu.corpus_score(list(hypotheses), [list(references)])
    return round(score.score, 2), str(bleu.get_signature())
