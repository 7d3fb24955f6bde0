"""Subword regularisation (Kudo, 2018): a freshly sampled segmentation of the training set for each epoch.

With ``tokenizer.sampling_alpha > 0`` every training sentence is re-encoded at the start of each epoch by
l-best sampling: one of the ``sampling_nbest`` best unigram segmentations, drawn with probability
proportional to ``P(segmentation) ** alpha`` (smaller alpha = more varied). Validation, export and
serving always use the one best segmentation.

The draw uses our own generator seeded by ``(seed, epoch)``, not SentencePiece's built-in sampler: that
one gives different samples in different processes for the same seed, which would break exact resume.
"""

from __future__ import annotations

import numpy as np
import sentencepiece as spm

from training.data import ParallelDataset, Texts


def sample_dataset(
    processor: spm.SentencePieceProcessor,
    texts: Texts,
    kept: ParallelDataset,
    alpha: float,
    nbest: int,
    max_len: int,
    seed: int,
    epoch: int,
) -> ParallelDataset:
    """The pairs of ``kept`` (its ``line_ids`` index ``texts``), each side re-encoded by l-best sampling.

    Which pairs train was decided once, on the best segmentation; a sample longer than ``max_len`` is
    cut to it. The same ``(seed, epoch)`` gives the same sample in any process.
    """
    rng = np.random.default_rng([seed, epoch, 0x5B])
    piece_log_p = np.array([processor.get_score(i) for i in range(processor.get_piece_size())])
    sides: list[list[np.ndarray]] = [[], []]
    for side, (side_texts, best) in enumerate(((texts[0], kept.src), (texts[1], kept.tgt))):
        for line, fallback in zip(kept.line_ids.tolist(), best, strict=True):
            candidates = processor.nbest_encode(side_texts[line], nbest_size=nbest, out_type=int)
            if len(candidates) < 2:
                sides[side].append(fallback)
                continue
            log_p = np.array([piece_log_p[ids].sum() for ids in candidates])  # (n,) log P(segmentation)
            weights = np.exp(alpha * (log_p - log_p.max()))
            ids = candidates[rng.choice(len(candidates), p=weights / weights.sum())]
            sides[side].append(np.asarray(ids[:max_len], dtype=np.int32))
    return ParallelDataset(sides[0], sides[1], kept.line_ids)
