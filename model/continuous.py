"""Continuous batching: sentences join and leave a running decoder batch at every step boundary (no torch).

:class:`ContinuousBatch` drives :class:`model.search.SearchBatch` (the one beam search) one step at a
time: :meth:`~ContinuousBatch.admit` queues a sentence with its own :class:`DecodingOptions`; each
:meth:`~ContinuousBatch.step` joins the queued sentences to the live rows (one BOS row each, at position
0), runs one decoder call over every row, and returns the sentences that finished, whose rows are freed
before the next call. A sentence's hypotheses do not depend on what shares its steps (up to float
summation order: fp32 scores agree to ~1e-6 with the sentence decoded alone).

:class:`OrtRowStep` is the step side over an :class:`OrtModel`'s fp32/int8/fp16 graphs on host buffers. Rows at
different positions share one call through the step graph's right-padded self-attention cache: row r's past fills
slots [0, position) of its cache row and the call writes its new K/V at slot ``position`` in place (one IO binding
kept across calls, ``model.runtime.StepBinding``); each row attends to its own slots only, so no mask and no
padding of the pasts to a common length. The cache rows are laid out in blocks, one per live sentence, and stay
where they are while the search reorders its beams: a call copies only the rows whose cache row changes (a second
child of a beam, a block moved into a retired sentence's place), not the whole cache. The cross-attention K/V are
held once per live sentence, in block order; when the blocks are all the same size (every sentence at the service's
beam size) the beams of a sentence share them (the step graph's ``sentences`` axis).
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import numpy as np
import onnxruntime as ort

from model.config import ModelConfig
from model.decoding import DecodingOptions
from model.runtime import IN_PLACE_MIN, OrtModel, RowGather, StepBinding
from model.search import Hypothesis, SearchBatch, StepOutput
from model.signature import CAPACITY_STEP, MAX_CANDIDATES
from model.tokenizer import pad_sources

log = logging.getLogger(__name__)

# An encoder call costs about what this many more padded source tokens do (fp32 on 2 cores: ~1.3 ms a call, ~0.04 ms
# a token, from B x S = 1x8 up to 32x48): what one more call must save in padding to be worth making.
ENCODER_CALL_TOKENS = 32

# Up to this many cache rows to copy, each is copied by itself (its own written slots, no temporary) when no
# target is also a source; more, or overlapping ones, go through one gather and one scatter per length group.
ROW_BY_ROW = 64


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
    beams: np.ndarray | None = None  # (B,) each one's beam size: the rows it will have (None: 1 each)


class OrtRowStep:
    """A decoder step whose rows may sit at different positions; rows are added and dropped between calls.

    :meth:`keep` ``(reorder (R,))`` gives, for each row to keep, the previous call's row it continues; rows
    not named are freed at once (retired sentences, pruned beams). ``__call__(tokens (N,), positions (N,),
    k, admitted)`` then decodes the kept rows and, after them, one row per ``admitted`` sentence (N = R + B).

    The cache is laid out in **blocks**, one per live sentence, in the order of its cross K/V entries: block m
    holds ``block[m]`` cache rows (its beam size; 1 for a newcomer's first call when padding all newcomers to
    their beams would add over a quarter of the rows), and ``slot[i]`` is the cache row of the search's row i.
    The search reorders its rows as it likes; the cache rows stay where they are: a beam that continues its
    parent keeps the parent's cache row, and only a second child of a parent is copied, into a row of the
    block no beam continues; a retired sentence's block is filled by the last block (and its cross K/V entry
    by the last entry). So a call copies the rows whose cache row changed, not the whole cache. Every cache row
    is fed to the decoder: rows of a block that no beam uses (a newcomer padded to its beam size) repeat the
    block's first row and their outputs are dropped. When every block has the same size, the beams of a
    sentence share its cross K/V entry (the step graph's ``sentences`` axis); otherwise each row is fed its
    sentence's entry, gathered once and reused while the layout stays the same.

    The buffers have room to spare (rows and slots; the decoder's attention reads each row's own slots only, so
    spare slots cost memory, not time): the cache grows by half its slots when the oldest row needs more, and
    is cut when it holds over four times what the rows need.
    """

    def __init__(self, model: OrtModel) -> None:
        self.model = model
        cfg = model.config
        # One array holds every layer's self-attention K and V, (2 x layers, rows allocated, H, C, Dh), right-padded:
        # a copy of cache rows is one numpy operation over all of them; each past_* input is a contiguous view.
        self._store = self._empty_store(0, CAPACITY_STEP)
        self._cross = [np.zeros((0, cfg.n_heads, 0, cfg.head_dim), model.cache_dtype) for _ in model.cross_names]
        self.src_mask = np.zeros((0, 0), dtype=bool)  # (M, S) for the M live sentences, in block order
        self.sentences = np.zeros(0, dtype=np.int64)  # (M,) the sentence id of each block and cross K/V entry
        self.block = np.zeros(0, dtype=np.int64)  # (M,) cache rows of each block
        self.slot = np.zeros(0, dtype=np.int64)  # (N,) the cache row of each row
        self.row_sentence = np.zeros(0, dtype=np.int64)  # an id per admitted sentence, for each row
        self.next_sentence = 0
        self.written = np.zeros(0, dtype=np.int64)  # (cache rows,) slots each cache row has written
        self.copied_rows = 0  # cache rows copied by keep() so far (second children, moved blocks)
        self.copied_slots = 0  # and their slots (rows x slots copied)
        self.rows = RowGather()
        self._layout = 0  # bumped when blocks move or change: the per-row cross K/V are gathered again
        self._per_row: tuple[int, list[np.ndarray], np.ndarray] | None = None  # (layout, cross, mask)
        # The OrtValues bound for the last call's past and cross K/V (they share the arrays' memory), with what
        # they were made for: reused while the store, the rows in use and the layout are the same.
        self._bound_past: tuple[np.ndarray, int, list] | None = None
        self._bound_cross: tuple[int, list] | None = None
        self.binding = StepBinding(model)

    @property
    def n_rows(self) -> int:
        return self.row_sentence.size

    @property
    def n_cache_rows(self) -> int:
        """Cache rows in use (the rows each call feeds): the blocks' sizes added up."""
        return int(self.block.sum())

    @property
    def past(self) -> list[np.ndarray]:
        """The self-attention K/V of the cache rows in use, each (rows, H, C, Dh) (contiguous views)."""
        return list(self._store[:, : self.n_cache_rows])

    @property
    def cross(self) -> list[np.ndarray]:
        """The cross-attention K/V of the live sentences, each (M, H, S, Dh) (contiguous views)."""
        m = self.sentences.size
        return [buf[:m] for buf in self._cross]

    @property
    def capacity(self) -> int:
        """Cache slots per row (the oldest row's past and room for the next steps)."""
        return self._store.shape[3]

    def __call__(self, tokens: np.ndarray, positions: np.ndarray, k: int, admitted: Admitted | None) -> StepOutput:
        if k > MAX_CANDIDATES:
            raise ValueError(
                f"the decoder graph returns at most {MAX_CANDIDATES} candidates per row, {k} asked: use a smaller beam"
            )
        n_new = 0 if admitted is None else admitted.src_ids.shape[0]
        n_rows = self.n_rows + n_new
        if tokens.shape != (n_rows,) or positions.shape != (n_rows,):
            raise ValueError(f"{tokens.shape[0]} tokens and {positions.shape[0]} positions for {n_rows} rows")
        if admitted is not None:
            self._add(admitted)
        needed = int(positions.max(initial=0)) + 1
        self._fit(self.n_cache_rows, needed)
        fill = self._feed_rows()
        tokens = np.asarray(tokens, dtype=np.int64)[fill]
        positions = np.asarray(positions, dtype=np.int64)[fill]
        cross, src_mask = self._cross_feed()
        feeds = {
            "tokens": tokens[:, None],  # (rows, 1)
            "positions": positions[:, None],  # (rows, 1): each row's past fills slots [0, position)
            "top_k": np.zeros(min(k, self.model.config.vocab_size), dtype=np.int64),  # (k,)
            "src_pad_mask": src_mask,  # (M, S) per sentence, or (rows, S) per row
        }
        past = self.past
        if past[0].size < IN_PLACE_MIN:  # a small cache goes through a plain run (fresh arrays): back into the store
            (scores, ids, eos, cross_attn), present = self.model.run_step(feeds, past, cross)
            for buf, new in zip(past, present, strict=True):
                buf[...] = new
        else:  # the step writes its K/V into the store in place
            scores, ids, eos, cross_attn = self.binding.run(feeds, *self._ort_values(past, cross))
        self.written = positions + 1
        slot = self.slot  # back to the search's rows; unused rows' outputs dropped
        return StepOutput(scores[slot], ids[slot], eos[slot], cross_attn[slot])

    def keep(self, reorder: np.ndarray) -> None:
        """Keep the continuing rows (freeing the others): each keeps its parent's cache row, or (a second child
        of a parent) is copied into a row of its block that no beam continues; blocks of sentences with no row
        left are filled by the last blocks, their cross K/V entries by the last entries; the cross K/V are cut
        to the source columns the live sentences read."""
        reorder = np.asarray(reorder, dtype=np.int64)
        parent = self.slot[reorder]  # (R,) the cache row each kept row continues
        self.row_sentence = self.row_sentence[reorder]
        ends = np.cumsum(self.block)
        old_start = ends - self.block
        old_block = np.searchsorted(ends, parent, side="right")  # (R,) the block of each kept row
        m_old = self.sentences.size
        alive = np.zeros(m_old, dtype=bool)
        alive[old_block] = True
        order = _fill_holes(alive)  # (M',) the old block of each new block
        moved_blocks = order.size != m_old or not np.array_equal(order, np.arange(m_old))
        new_index = np.full(m_old, -1, dtype=np.int64)
        new_index[order] = np.arange(order.size)
        new_blk = new_index[old_block]  # (R,)
        sizes = np.maximum(self.block[order], np.bincount(new_blk, minlength=order.size))  # a newcomer's grows
        start = np.cumsum(sizes) - sizes
        offset = parent - old_start[old_block]  # the parent's row within its block
        first = np.zeros(reorder.size, dtype=bool)  # the first row continuing each parent keeps its cache row
        first[np.unique(parent, return_index=True)[1]] = True
        slot = np.empty(reorder.size, dtype=np.int64)
        slot[first] = start[new_blk[first]] + offset[first]
        if not first.all():  # the other children take the block's rows no beam continues, in order
            claimed = np.zeros(int(sizes.sum()), dtype=bool)
            claimed[slot[first]] = True
            free = np.flatnonzero(~claimed)
            free_blk = np.searchsorted(np.cumsum(sizes), free, side="right")
            needy = np.flatnonzero(~first)
            needy = needy[np.argsort(new_blk[needy], kind="stable")]
            blk = new_blk[needy]
            rank = np.arange(needy.size) - np.searchsorted(blk, blk)
            slot[needy] = free[np.searchsorted(free_blk, blk) + rank]
        self._fit(max(int(sizes.sum()), self.n_cache_rows))  # rows for blocks that grew (a newcomer's beams)
        copy = slot != parent
        if copy.any():
            self._copy_rows(parent[copy], slot[copy])
        self.slot = slot
        changed = moved_blocks or not np.array_equal(sizes, self.block[order])
        self.block = sizes
        if moved_blocks:
            self._keep_entries(order)
        if changed:
            self._layout += 1
        if not self.sentences.size:  # nothing live: start afresh (small buffers, no slots)
            self._reset()

    def _copy_rows(self, src: np.ndarray, dst: np.ndarray) -> None:
        """Copy cache rows ``src`` to ``dst`` (as if all were read before any is written: they may overlap), the
        slots each has written. Rows one by one when no target is also a source (no temporary); else one gather
        and one scatter per group of rows, two groups when their lengths differ widely (a long sentence's rows
        beside short ones'), each group up to its longest."""
        written = np.zeros(max(self.written.size, self.n_cache_rows, int(dst.max()) + 1), dtype=np.int64)
        written[: self.written.size] = self.written
        lengths = written[src]
        store = self._store
        targets = np.zeros(written.size, dtype=bool)
        targets[dst] = True
        if dst.size <= ROW_BY_ROW and not targets[src].any():
            for s, d, length in zip(src.tolist(), dst.tolist(), lengths.tolist(), strict=True):
                store[:, d, :, :length] = store[:, s, :, :length]
            self.copied_slots += int(lengths.sum())
        else:
            middle = (int(lengths.max()) + int(lengths.min())) // 2
            groups = [lengths <= middle, lengths > middle] if lengths.max() > 2 * lengths.min() + 8 else [slice(None)]
            taken = []  # every group's rows read before any is written (a target may be another group's source)
            for group in groups:
                length = int(lengths[group].max())
                taken.append((dst[group], length, store[:, src[group], :, :length]))  # (2L, rows, H, length, Dh)
                self.copied_slots += taken[-1][0].size * length
            for rows, length, values in taken:
                store[:, rows, :, :length] = values
        written[dst] = lengths
        self.written = written
        self.copied_rows += dst.size

    def _reset(self) -> None:
        kept = self.next_sentence, self.rows, self.copied_rows, self.copied_slots, self.binding
        self.__init__(self.model)
        self.next_sentence, self.rows, self.copied_rows, self.copied_slots, self.binding = kept

    def _keep_entries(self, order: np.ndarray) -> None:
        """The cross K/V entries and source mask rows of the blocks in ``order`` (old entry indices), cut to the
        source columns the live sentences read."""
        mask = self.src_mask[order]
        used = (~mask).any(axis=0)  # (S,) source columns some live sentence reads
        width = int(np.flatnonzero(used)[-1]) + 1 if used.any() else 0
        if width < mask.shape[1]:  # a copy of every entry into narrower buffers (the widest sentence left)
            cfg = self.model.config
            shape = (max(order.size, 1) * 3 // 2 + 4, cfg.n_heads, width, cfg.head_dim)
            cross = [np.zeros(shape, self.model.cache_dtype) for _ in self._cross]
            for new, old in zip(cross, self._cross, strict=True):
                new[: order.size] = old[order, :, :width]
            self._cross = cross
        else:  # entries that move: the last ones into the retired ones' places
            moved = np.flatnonzero(order != np.arange(order.size))
            for buf in self._cross:
                buf[moved] = buf[order[moved]]
        self.src_mask = mask[:, :width]
        self.sentences = self.sentences[order]

    def _fit(self, n: int, needed: int | None = None) -> None:
        """Buffers with room for ``n`` cache rows and ``needed`` slots (None: as they are): grown by half when
        they are short, cut when they hold over four times the slots needed (a long sentence retired) or the
        rows (and 64 more). The rows in use keep their contents."""
        rows, capacity = self._store.shape[1], self.capacity
        new_rows = n + n // 2 + 4 if n > rows or rows > 4 * n + 64 else rows
        new_capacity = capacity
        if needed is not None and needed > capacity:
            new_capacity = needed + max(CAPACITY_STEP, capacity // 2)
        elif needed is not None and capacity > 4 * needed + 16 * CAPACITY_STEP:
            new_capacity = needed + CAPACITY_STEP
        if (new_rows, new_capacity) == (rows, capacity):
            return
        store = self._empty_store(new_rows, new_capacity)
        filled = int(self.written.max(initial=0))  # slots the cache rows have written
        keep_rows, keep_slots = min(self.n_cache_rows, rows, new_rows), min(filled, capacity, new_capacity)
        store[:, :keep_rows, :, :keep_slots] = self._store[:, :keep_rows, :, :keep_slots]
        self._store = store

    def _empty_store(self, rows: int, capacity: int) -> np.ndarray:
        cfg = self.model.config
        shape = (len(self.model.past_names), rows, cfg.n_heads, capacity, cfg.head_dim)  # (2L, rows, H, C, Dh)
        return np.zeros(shape, self.model.cache_dtype)

    def _ort_values(self, past: list[np.ndarray], cross: list[np.ndarray]) -> tuple[list, list]:
        """OrtValues over ``past`` (views of the store) and ``cross`` for an in-place call: the last call's,
        unless the store, the rows in use or the layout changed since."""
        n = past[0].shape[0]
        bound = self._bound_past
        if bound is None or bound[0] is not self._store or bound[1] != n:
            bound = self._bound_past = (self._store, n, [ort.OrtValue.ortvalue_from_numpy(a) for a in past])
        crossed = self._bound_cross
        if crossed is None or crossed[0] != self._layout:
            values = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a)) for a in cross]
            crossed = self._bound_cross = (self._layout, values)
        return bound[2], crossed[1]

    def _feed_rows(self) -> np.ndarray:
        """(cache rows,) the search's row each cache row is fed: its own, or for a row no beam uses, its block's
        first row (its outputs are dropped)."""
        fill = np.empty(self.n_cache_rows, dtype=np.int64)
        if fill.size == self.slot.size:  # every cache row in use (the usual case): the inverse of ``slot``
            fill[self.slot] = np.arange(self.slot.size)
            return fill
        ends = np.cumsum(self.block)
        blk = np.searchsorted(ends, self.slot, side="right")  # (N,) the block of each row
        first = np.empty(self.block.size, dtype=np.int64)
        first[blk[::-1]] = np.arange(blk.size)[::-1]  # the first row of each block (every block has one)
        fill[:] = np.repeat(first, self.block)
        fill[self.slot] = np.arange(self.slot.size)
        return fill

    def _cross_feed(self) -> tuple[list[np.ndarray], np.ndarray]:
        """The cross K/V and source mask to feed: one entry per sentence when the blocks are all the same size
        (its rows share it); else one per cache row (gathered when the layout changes, reused while it does not)."""
        if self.block.size == 0 or (self.block == self.block[0]).all():
            return self.cross, self.src_mask
        cached = self._per_row
        if cached is None or cached[0] != self._layout:
            index = np.repeat(np.arange(self.block.size), self.block)  # (rows,) the entry of each cache row
            cross = self.rows.many("row_cross", self.cross, index)
            cached = self._per_row = (self._layout, cross, self.src_mask[index])
        return cached[1], cached[2]

    def _add(self, admitted: Admitted) -> None:
        """Encode the newcomers and append them: their cross K/V (sources padded to a common width) and a block
        each, of their beam size when padding every newcomer's first row to it adds at most a quarter of the
        rows (the cross K/V then stay one per sentence), else of one row (it grows when the beams come)."""
        src_mask = np.asarray(admitted.src_pad_mask, dtype=bool)
        n_new, new_len = src_mask.shape
        n_old, old_len = self.src_mask.shape
        width = max(new_len, old_len)
        cfg = self.model.config
        if n_old + n_new > self._cross[0].shape[0] or width > old_len:  # no room: bigger buffers, one copy
            shape = ((n_old + n_new) * 3 // 2 + 4, cfg.n_heads, width, cfg.head_dim)  # (M', H, width, Dh)
            cross = [np.zeros(shape, self.model.cache_dtype) for _ in self._cross]
            for buf, old in zip(cross, self._cross, strict=True):
                buf[:n_old, :, :old_len] = old[:n_old]
            self._cross = cross
        mask = np.ones((n_old + n_new, width), dtype=bool)  # (M + B, width) True = padding
        mask[:n_old, :old_len], mask[n_old:, :new_len] = self.src_mask, src_mask
        self.src_mask = mask
        for buf in self._cross:
            buf[n_old : n_old + n_new] = 0  # padding columns are masked, never NaN from a previous entry
        lengths = (~src_mask).sum(axis=1)
        for group in length_groups(lengths):  # the newcomers in runs of similar length, each padded to its longest
            longest = int(lengths[group].max())
            encoded = self.model.encode(admitted.src_ids[group, :longest], src_mask[group, :longest])
            for buf, new in zip(self._cross, encoded, strict=True):  # new: (b, H, longest, Dh)
                buf[n_old + group, :, :longest] = new
        beams = np.ones(n_new, dtype=np.int64) if admitted.beams is None else np.asarray(admitted.beams, np.int64)
        rows = self.n_cache_rows
        padded = rows + int(beams.sum())
        same = self.block.size == 0 or (self.block == self.block[0]).all()
        pad = (
            same
            and (beams == (self.block[0] if self.block.size else beams[0])).all()
            and 4 * (padded - rows - n_new) <= padded
        )
        sizes = beams if pad else np.ones(n_new, dtype=np.int64)
        self.slot = np.concatenate([self.slot, rows + np.cumsum(sizes) - sizes])
        self.block = np.concatenate([self.block, sizes])
        ids = np.arange(self.next_sentence, self.next_sentence + n_new)
        self.sentences = np.concatenate([self.sentences, ids])
        self.row_sentence = np.concatenate([self.row_sentence, ids])
        self.next_sentence += n_new
        self._layout += 1


def _fill_holes(alive: np.ndarray) -> np.ndarray:
    """The order of the surviving blocks (old indices) when each dead block's place is taken by the last
    surviving one: survivors before the new end stay where they are."""
    survivors = np.flatnonzero(alive)
    m = survivors.size
    order = np.arange(m)
    holes = np.flatnonzero(~alive[:m])  # places to fill, in order
    tail = survivors[survivors >= m]  # survivors past the new end, moved into them
    order[holes] = tail
    return order


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
            beams = np.array([options.beam_size for _, _, options in self.pending], dtype=np.int64)
            admitted = Admitted(src_ids, src_mask, beams)
            self.pending = []
        if not search.live:
            return []
        width = search.width()
        out = self.step_fn(search.tokens, search.positions(), width, admitted)
        retired = search.advance(out, width)
        self.step_fn.keep(search.reorder)  # the retired sentences' rows are freed now, not at the next call
        log.debug("continuous step: %d rows, %d retired", out.scores.shape[0], len(retired))
        return retired
