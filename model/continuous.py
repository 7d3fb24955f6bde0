"""Continuous batching: sentences join and leave a running decoder batch at every step boundary (no torch).

:class:`ContinuousBatch` drives :class:`model.search.SearchBatch` (the one beam search) one step at a
time: :meth:`~ContinuousBatch.admit` queues a sentence with its own :class:`DecodingOptions`; each
:meth:`~ContinuousBatch.step` joins the queued sentences to the live rows (one BOS row each, at position
0), runs one decoder call over every row, and returns the sentences that finished, whose rows are freed
before the next call. A sentence's hypotheses do not depend on what shares its steps (up to float
summation order: fp32 scores agree to ~1e-6 with the sentence decoded alone).

:class:`OrtRowStep` is the step side over an :class:`OrtModel`'s fp32/int8/fp16 graphs on host buffers.
Rows at different positions share one call through the step graph's right-padded self-attention cache: row r's
past fills slots [0, position) of its buffer row and the call writes its new K/V at slot ``position`` in
place (``OrtModel.run_step``); each row attends to its own slots only, so no mask and no padding of the pasts
to a common length. The buffers are as wide as the oldest row needs (plus ``CAPACITY_STEP`` slots of room),
and are gathered once per call when rows change (kept, retired, admitted). Source columns that are padding on
every row are cut off the cross K/V. The cross-attention K/V are held once per live sentence; a call whose
rows come in equal blocks per sentence (the usual case: every sentence at the service's beam size) feeds
them so, its beams sharing them (the step graph's ``sentences`` axis). A newcomer's single first row among
the beams is padded to a block (rows copying it, whose outputs are dropped) when that adds at most a quarter
of the rows; any other call feeds one per row.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import numpy as np

from model.config import ModelConfig
from model.decoding import DecodingOptions
from model.runtime import OrtModel, RowGather
from model.search import Hypothesis, SearchBatch, StepOutput, is_identity, sentence_blocks, sentence_runs
from model.signature import CAPACITY_STEP, MAX_CANDIDATES
from model.tokenizer import pad_sources

log = logging.getLogger(__name__)

# An encoder call costs about what this many more padded source tokens do (fp32 on 2 cores: ~1.3 ms a call, ~0.04 ms
# a token, from B x S = 1x8 up to 32x48): what one more call must save in padding to be worth making.
ENCODER_CALL_TOKENS = 32


def length_groups(lengths: np.ndarray, call_tokens: int = ENCODER_CALL_TOKENS) -> list[np.ndarray]:
    """Indices of ``lengths`` in groups to encode together, each padded to its longest: the cut of the sorted
    lengths into runs that minimises ``calls x call_tokens + padded tokens`` (exact, O(n^2) over the sentences).

    A running batch's newcomers arrive in any order of length; padded to the longest, a cohort of mixed lengths
    costs the encoder twice its tokens (measured: 1.36 s for 1,000 sentences joined in groups of ~12, against
    0.74 s in sorted batches of 32).
    """
    order = np.argsort(lengths, kind="stable")
    ordered = np.asarray(lengths, dtype=np.int64)[order]
    n = ordered.size
    best = np.zeros(n + 1, dtype=np.int64)  # best[j]: the least cost of encoding the j shortest
    cut = np.zeros(n + 1, dtype=np.int64)  # where the last group of the best j starts
    for j in range(1, n + 1):
        starts = np.arange(j)
        costs = best[:j] + call_tokens + (j - starts) * ordered[j - 1]  # the last group = ordered[i:j]
        cut[j] = int(np.argmin(costs))
        best[j] = costs[cut[j]]
    groups = []
    j = n
    while j > 0:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]


class Admitted(NamedTuple):
    """Sentences joining at this call: their rows come after the continuing rows, one per sentence."""

    src_ids: np.ndarray  # (B, S) int64, EOS appended, right-padded
    src_pad_mask: np.ndarray  # (B, S) bool, True = padding


class PaddedBlocks(NamedTuple):
    """A call's rows padded to equal blocks per sentence (see :meth:`OrtRowStep._padded_blocks`)."""

    source: np.ndarray  # (N',) the row each fed row copies (its own, or its sentence's first row for padding)
    rows: np.ndarray  # (N,) the fed row of each row


class OrtRowStep:
    """A decoder step whose rows may sit at different positions; rows are added and dropped between calls.

    :meth:`keep` ``(reorder (R,))`` gives, for each row to keep, the previous call's row it continues; rows
    not named are freed at once (retired sentences, pruned beams). ``__call__(tokens (N,), positions (N,),
    k, admitted)`` then decodes the kept rows and, after them, one row per ``admitted`` sentence (N = R + B).

    The cross-attention K/V are kept once per live sentence (``cross``, ``src_mask``, ``sentences``: the
    id of each entry), in the order of the rows' blocks. A call whose rows come in equal blocks per sentence
    (every live sentence at the same beam size, no newcomer on its first row) feeds them as they are, and
    the beams of a sentence share its entry; any other call feeds one entry per row, gathered once and
    reused while the rows' sentences stay the same.
    """

    def __init__(self, model: OrtModel) -> None:
        self.model = model
        cfg = model.config
        self.past = model.empty_cache(0)  # each (N, H, C, Dh), right-padded
        self.cross = [np.zeros((0, cfg.n_heads, 0, cfg.head_dim), model.cache_dtype) for _ in model.cross_names]
        self.src_mask = np.zeros((0, 0), dtype=bool)  # (M, S) for the M live sentences
        self.sentences = np.zeros(0, dtype=np.int64)  # (M,) the sentence id of each cross K/V entry
        self.row_sentence = np.zeros(0, dtype=np.int64)  # an id per admitted sentence, for each row
        self.next_sentence = 0
        self.rows = RowGather()
        # What keep() asked of the past and the next call applies, in the gather that also makes room for the
        # newcomers (one copy of the cache per call, not one per keep plus one per admission):
        self._reorder: np.ndarray | None = None  # the rows of ``past`` that continue, in order (None: all of them)
        self._per_row: tuple[np.ndarray, list[np.ndarray], np.ndarray] | None = None  # (row_sentence, cross, mask)

    @property
    def n_rows(self) -> int:
        return self.row_sentence.size

    @property
    def capacity(self) -> int:
        """Cache slots per row (the oldest row's past and room for the next steps)."""
        return self.past[0].shape[2]

    def __call__(self, tokens: np.ndarray, positions: np.ndarray, k: int, admitted: Admitted | None) -> StepOutput:
        if k > MAX_CANDIDATES:
            raise ValueError(
                f"the decoder graph returns at most {MAX_CANDIDATES} candidates per row, {k} asked: use a smaller beam"
            )
        n_new = 0 if admitted is None else admitted.src_ids.shape[0]
        n_rows = self.n_rows + n_new
        if tokens.shape != (n_rows,) or positions.shape != (n_rows,):
            raise ValueError(f"{tokens.shape[0]} tokens and {positions.shape[0]} positions for {n_rows} rows")
        tokens = np.asarray(tokens, dtype=np.int64)
        positions = np.asarray(positions, dtype=np.int64)
        padded = self._padded_blocks(n_new)
        self._settle_past(n_new, padded, int(positions.max(initial=0)) + 1)
        if admitted is not None:
            self._add(admitted)
        if padded is None:
            cross, src_mask = self._cross_feed()
        else:  # each sentence's rows padded to a block of G: the cross K/V once per sentence
            tokens, positions = tokens[padded.source], positions[padded.source]
            cross, src_mask = self.cross, self.src_mask
        feeds = {
            "tokens": tokens[:, None],  # (N, 1)
            "positions": positions[:, None],  # (N, 1): each row's past fills slots [0, position)
            "top_k": np.zeros(min(k, self.model.config.vocab_size), dtype=np.int64),  # (k,)
            "src_pad_mask": src_mask,  # (M, S) per sentence, or (N, S) per row
        }
        (scores, ids, eos, cross_attn), self.past = self.model.run_step(feeds, self.past, cross)  # K/V in place
        if padded is not None:  # back to one row per row; the padding rows' K/V are dropped by the next gather
            rows = padded.rows
            scores, ids, eos, cross_attn = scores[rows], ids[rows], eos[rows], cross_attn[rows]
            self._reorder = rows
        return StepOutput(scores, ids, eos, cross_attn)

    def keep(self, reorder: np.ndarray) -> None:
        """Keep the continuing rows (freeing the others); then keep the cross K/V of the live sentences only, in
        the order of the rows' blocks, cut to the source columns they read.

        The past K/V are gathered by the next call, once for every keep since the last one and the newcomers'
        room. The cuts are made by gathers, into contiguous buffers: a sliced view given to onnxruntime would be
        copied by it at every call (+1.5 ms per call of 95 rows, ~15%, measured).
        """
        reorder = np.asarray(reorder, dtype=np.int64)
        if not is_identity(reorder, self.n_rows):
            self.row_sentence = self.row_sentence[reorder]
            self._reorder = reorder if self._reorder is None else self._reorder[reorder]
        order = sentence_blocks(self.row_sentence)
        if order is None or len(np.unique(order)) < len(order):  # no equal blocks: the live ones, first-row order
            _, first = np.unique(self.row_sentence, return_index=True)
            order = self.row_sentence[np.sort(first)]
        index = self._entries(order)
        used = (~self.src_mask[index]).any(axis=0)  # (S,) source columns some live sentence reads
        width = int(np.flatnonzero(used)[-1]) + 1 if used.any() else 0
        if not is_identity(index, len(self.sentences)) or width < self.src_mask.shape[1]:
            self.cross = self.rows.many("cross", [kv[:, :, :width] for kv in self.cross], index)
            self.src_mask = self.src_mask[index, :width]
            self.sentences = order

    def _padded_blocks(self, n_new: int) -> PaddedBlocks | None:
        """The rows of the next call (the kept ones, then one per newcomer) laid out in equal blocks of G per
        sentence, padding rows copying their sentence's first row, when that pays: the cross K/V then go in once
        per sentence (its rows read them as one block) instead of once per row (a gather of every row's cross
        K/V, and G reads of each in the graph). A newcomer's first row is what breaks the blocks: it has one row
        where the others have their beams. None when the rows already come in blocks, when a sentence's rows are
        not side by side in the order of the cross K/V entries, or when padding would add over a quarter of
        the rows."""
        ids = np.arange(self.next_sentence, self.next_sentence + n_new)
        row_sentence = np.concatenate([self.row_sentence, ids])
        n = row_sentence.size
        if n == 0:
            return None
        starts, runs = sentence_runs(row_sentence)  # first row and rows of each run
        size = int(runs.max())
        extra = size * runs.size - n
        if extra == 0 or 4 * extra > n or not np.array_equal(row_sentence[starts], np.r_[self.sentences, ids]):
            return None
        offset = np.arange(size)  # (G,)
        source = np.where(offset < runs[:, None], starts[:, None] + offset, starts[:, None])  # (sentences, G)
        rows = np.repeat(np.arange(runs.size) * size, runs) + np.arange(n) - np.repeat(starts, runs)  # (n,)
        return PaddedBlocks(source.reshape(-1), rows)

    def _settle_past(self, n_new: int, padded: PaddedBlocks | None, needed: int) -> None:
        """Apply the kept rows to the past K/V, with ``n_new`` rows after them for the newcomers (``padded``: in
        the call's padded blocks), in buffers with room for ``needed`` slots (the oldest row's past and this
        call's K/V): one gather into contiguous buffers (none when nothing changed), a copy more when the buffers
        grow (every ``CAPACITY_STEP`` steps of the oldest row) or shrink (its sentence retired)."""
        capacity = self.capacity
        if capacity < needed or capacity > needed + 2 * CAPACITY_STEP:
            capacity = needed + CAPACITY_STEP - 1
        if self._reorder is None and not n_new and padded is None and capacity == self.capacity:
            return
        index = self._reorder
        if padded is not None:
            index = np.arange(self.past[0].shape[0]) if index is None else index
            old = padded.source[padded.source < index.size]  # the kept rows' physical rows come first
            index, n_new = index[old], padded.source.size - old.size
        self.past = self.rows.many("past", self.past, index, zeros=n_new, capacity=capacity)
        self._reorder = None

    def _entries(self, ids: np.ndarray) -> np.ndarray:
        """The index into ``cross`` of each sentence id in ``ids``."""
        if np.array_equal(ids, self.sentences):
            return np.arange(len(ids))
        sorter = np.argsort(self.sentences)
        index = sorter[np.searchsorted(self.sentences, ids, sorter=sorter).clip(max=len(sorter) - 1)]
        if len(ids) and not np.array_equal(self.sentences[index], ids):  # a row of a sentence with no entry
            raise RuntimeError(f"rows of sentences {sorted(set(ids) - set(self.sentences))} have no cross K/V")
        return index

    def _cross_feed(self) -> tuple[list[np.ndarray], np.ndarray]:
        """The cross K/V and source mask to feed: one per sentence when the rows' blocks are the entries, in
        order; else one per row (gathered when the rows' sentences change, reused while they do not)."""
        if np.array_equal(sentence_blocks(self.row_sentence), self.sentences):
            return self.cross, self.src_mask
        cached = self._per_row
        if cached is None or not np.array_equal(cached[0], self.row_sentence):
            index = self._entries(self.row_sentence)
            cross = self.rows.many("row_cross", self.cross, index)
            cached = self._per_row = (self.row_sentence, cross, self.src_mask[index])
        return cached[1], cached[2]

    def _add(self, admitted: Admitted) -> None:
        """Encode the newcomers and append them: their cross K/V (sources padded to a common width) and one row
        each, with an all-masked past (its zeros made by ``_settle_past``)."""
        src_mask = np.asarray(admitted.src_pad_mask, dtype=bool)
        n_new, new_len = src_mask.shape
        n_old, old_len = self.src_mask.shape
        width = max(new_len, old_len)
        # One copy of the old entries into buffers sized for all (no pad-then-concatenate double copy).
        mask = np.ones((n_old + n_new, width), dtype=bool)  # (M + B, width) True = padding
        mask[:n_old, :old_len], mask[n_old:, :new_len] = self.src_mask, src_mask
        self.src_mask = mask
        cfg = self.model.config
        shape = (n_old + n_new, cfg.n_heads, width, cfg.head_dim)  # (M + B, H, width, Dh)
        cross = [np.zeros(shape, self.model.cache_dtype) for _ in self.cross]
        for buf, old in zip(cross, self.cross, strict=True):
            buf[:n_old, :, :old_len] = old
        lengths = (~src_mask).sum(axis=1)
        for group in length_groups(lengths):  # the newcomers in runs of similar length, each padded to its longest
            longest = int(lengths[group].max())
            encoded = self.model.encode(admitted.src_ids[group, :longest], src_mask[group, :longest])
            for buf, new in zip(cross, encoded, strict=True):  # new: (b, H, longest, Dh)
                buf[n_old + group, :, :longest] = new
        self.cross = cross
        ids = np.arange(self.next_sentence, self.next_sentence + n_new)
        self.sentences = np.concatenate([self.sentences, ids])
        self.row_sentence = np.concatenate([self.row_sentence, ids])
        self.next_sentence += n_new


class ContinuousBatch:
    """A running beam search that admits sentences and retires finished ones at every step boundary."""

    def __init__(self, step: OrtRowStep, config: ModelConfig) -> None:
        self.step_fn = step
        self.config = config
        self.search = SearchBatch(
            bos_id=config.bos_id, eos_id=config.eos_id, pad_id=config.pad_id, max_positions=config.max_positions
        )
        self.pending: list[tuple[object, list[int], DecodingOptions]] = []

    @property
    def live_rows(self) -> int:
        """Rows decoded by the next call for the sentences already live (newcomers not counted)."""
        return self.search.n_rows

    @property
    def live_sentences(self) -> int:
        return len(self.search.live)

    @property
    def idle(self) -> bool:
        return not self.search.live and not self.pending

    def admit(self, key: object, src_ids: list[int], options: DecodingOptions) -> None:
        """Queue one sentence (subword ids, without EOS) to join at the next step; ``key`` comes back with it."""
        width = 2 * options.beam_size + 3  # BOS, PAD and an early EOS banned
        if width > MAX_CANDIDATES:
            raise ValueError(
                f"beam_size {options.beam_size} needs {width} candidates per row; the graph gives {MAX_CANDIDATES}"
            )
        self.pending.append((key, list(src_ids), options))

    def drop(self, keys: set) -> None:
        """Cancel the sentences with these keys, queued or live: their rows are freed before the next call."""
        self.pending = [p for p in self.pending if p[0] not in keys]
        kept = self.search.drop(keys)
        if kept is not None:
            self.step_fn.keep(kept)

    def step(self) -> list[tuple[object, list[Hypothesis]]]:
        """Join the queued sentences, run one decoder call, and return the finished ``(key, hypotheses)``."""
        search = self.search
        admitted = None
        if self.pending:
            src_ids, src_mask = pad_sources([src for _, src, _ in self.pending], max_len=self.config.max_positions)
            lengths = (~src_mask).sum(axis=1)  # with the EOS: the sentence's attention columns
            for (key, _, options), length in zip(self.pending, lengths.tolist(), strict=True):
                search.admit(key, length - 1, options, attention_width=length)
            admitted = Admitted(src_ids, src_mask)
            self.pending = []
        if not search.live:
            return []
        width = search.width()
        out = self.step_fn(search.tokens, search.positions(), width, admitted)
        retired = search.advance(out, width)
        self.step_fn.keep(search.reorder)  # the retired sentences' rows are freed now, not at the next call
        log.debug("continuous step: %d rows, %d retired", out.scores.shape[0], len(retired))
        return retired
