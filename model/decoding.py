"""Decoding options: one frozen type, validated on creation, holding the paper's defaults (no torch, no numpy search).

Everything that decodes takes a :class:`DecodingOptions`: the numpy search, the service's engine and batcher
(requests with equal options share a batch), training-time BLEU and the export's checks. The HTTP schema
reads its defaults from :data:`PAPER`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


@dataclass(frozen=True)
class DecodingOptions:
    """How to decode: the one type for it (search, engine, batcher, training BLEU, export checks).

    The defaults are the paper's, written here only: beam 4, α = 0.6, max length = source + 50.
    Frozen and hashable: the batcher groups sentences by equal options.
    """

    beam_size: int = 4
    n_best: int = 1  # hypotheses returned per sentence, at most beam_size
    length_penalty: float = 0.6  # GNMT α: lp(Y) = ((5 + |Y|) / 6) ** α, |Y| counting the final EOS
    max_length_offset: int = 50  # a sentence's max output length is its source length + this
    max_length: int | None = None  # if set, the max output length of every sentence (replaces the above)
    min_length: int = 0  # EOS is forbidden until this many tokens were generated
    return_attention: bool = False
    # Stopping rule. None (default): exact — a sentence stops only when no live beam can still beat its
    # n_best-th finished hypothesis. A number p: CTranslate2's and fairseq's rule (patience factor, Kasai et
    # al., 2022) — stop once round(beam_size * p) hypotheses (and at least n_best) have finished; faster,
    # and it may miss a longer hypothesis that would have scored higher.
    patience: float | None = None

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError("invalid decoding options: " + "; ".join(problems))

    def problems(self) -> list[str]:
        """Every problem with this config at once, each saying what to change."""
        out: list[str] = []
        if not _is_int(self.beam_size) or self.beam_size < 1:
            out.append(f"beam_size must be an integer >= 1, got {self.beam_size!r}")
        if not _is_int(self.n_best) or self.n_best < 1:
            out.append(f"n_best must be an integer >= 1, got {self.n_best!r}")
        elif _is_int(self.beam_size) and self.n_best > self.beam_size:
            out.append(f"n_best ({self.n_best}) must not exceed beam_size ({self.beam_size})")
        if isinstance(self.length_penalty, bool) or not isinstance(self.length_penalty, (int, float)):
            out.append(f"length_penalty must be a number, got {self.length_penalty!r}")
        elif not math.isfinite(self.length_penalty):
            out.append(f"length_penalty must be finite, got {self.length_penalty!r}")
        if not _is_int(self.max_length_offset) or self.max_length_offset < 0:
            out.append(f"max_length_offset must be an integer >= 0, got {self.max_length_offset!r}")
        if self.max_length is not None and (not _is_int(self.max_length) or self.max_length < 1):
            out.append(f"max_length must be None or an integer >= 1, got {self.max_length!r}")
        if not _is_int(self.min_length) or self.min_length < 0:
            out.append(f"min_length must be an integer >= 0, got {self.min_length!r}")
        elif _is_int(self.max_length) and self.min_length > self.max_length:
            out.append(f"min_length ({self.min_length}) must not exceed max_length ({self.max_length})")
        if self.patience is not None:
            if isinstance(self.patience, bool) or not isinstance(self.patience, (int, float)):
                out.append(f"patience must be None (exact stopping) or a number > 0, got {self.patience!r}")
            elif not math.isfinite(self.patience) or self.patience <= 0:
                out.append(f"patience must be None (exact stopping) or a finite number > 0, got {self.patience!r}")
        if not isinstance(self.return_attention, bool):
            out.append(f"return_attention must be a bool, got {self.return_attention!r}")
        return out

    def penalty(self, length: int | np.ndarray) -> float | np.ndarray:
        """The GNMT length penalty lp(|Y|) = ((5 + |Y|) / 6) ** α."""
        return ((5.0 + np.asarray(length, dtype=np.float64)) / 6.0) ** self.length_penalty

    def patience_hypotheses(self) -> int:
        """With a ``patience``: how many finished hypotheses end a sentence, round(beam_size * patience)
        (half away from zero, as CTranslate2 rounds), at least ``n_best``. 0 when patience is None."""
        if self.patience is None:
            return 0
        return max(math.floor(self.beam_size * self.patience + 0.5), self.n_best)

    def max_lengths(self, src_lengths: Sequence[int] | np.ndarray) -> np.ndarray:
        """Each sentence's max output length (tokens before EOS): ``max_length`` or source + offset."""
        lengths = np.asarray(src_lengths)
        if lengths.ndim != 1 or (lengths.size and lengths.dtype.kind not in "iu") or (lengths < 0).any():
            raise ValueError(f"src_lengths must be a 1-D sequence of integers >= 0, got {src_lengths!r}")
        if self.max_length is not None:
            return np.full(lengths.shape, self.max_length, dtype=np.int64)
        return lengths.astype(np.int64) + self.max_length_offset


PAPER = DecodingOptions()  # beam 4, α 0.6, max length = source + 50
