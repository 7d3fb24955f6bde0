"""Beam search and greedy search in numpy over a decoder *step function* (no torch here, ever).

The same search serves training-time BLEU (a torch step function) and the ONNX service (an onnxruntime step
function). The network is reached only through :class:`StepFunction`:

- ``tokens`` (N,) int64: the last token of each live row; ``step`` is its 0-based decoding position.
  On the first call (``step == 0``) there is one row per sentence, in sentence order, each ``bos_id``,
  and ``reorder`` is None.
- ``reorder`` (N,) int64 on later calls: for each row, the row of the *previous* call whose decoder
  state it continues. This one gather does beam reordering, the expansion from one row per sentence to
  the beams, and the dropping of finished sentences (their rows simply do not appear).
- ``k``: how many candidates each row returns. It returns a :class:`StepOutput`: each row's ``k`` best
  tokens over the whole vocabulary (``scores`` (N, k) float32 log-probs and ``ids`` (N, k) int64, best
  first, equal scores in token-id order), each row's EOS log prob ``eos_log_probs`` (N,), and
  ``cross_attn`` (N, S) float32 or None: each row's attention over the S source positions.
  The search asks for 2K candidates plus one per banned token (BOS, PAD, EOS before ``min_length``):
  a sentence's 2K best extensions are among its rows' 2K best each, so nothing vocabulary-wide crosses
  the step boundary. :class:`FullTableStep` adapts a step function that returns the whole log-prob table.

Rows are laid out sentence by sentence (input order), best beam first. Per step and per sentence the
top 2K candidates (K = beam size) by cumulative log prob are taken, ties going to the lower row, then
the lower token id; EOS candidates among the first K go to the sentence's finished pool, scored with
the GNMT length penalty; the best K non-EOS candidates become the next beams. A sentence stops when its
pool holds ``n_best`` hypotheses and no live beam can still beat the ``n_best``-th of them, or at its
maximum length, where every live beam is finished with EOS; with a ``patience`` p (``DecodingOptions``),
once round(K * p) hypotheses have finished instead (CTranslate2's rule: fewer steps, not exact). Beam size 1
is greedy decoding: the argmax path, ending as soon as the argmax is EOS.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple, Protocol

import numpy as np

from model.decoding import PAPER, DecodingOptions

NEG_INF = -np.inf


class StepOutput(NamedTuple):
    """What a step returns per row: its ``k`` best candidates, its EOS log prob, its cross-attention."""

    scores: np.ndarray  # (N, k) float32 log-probs, best first
    ids: np.ndarray  # (N, k) int64 token ids
    eos_log_probs: np.ndarray  # (N,) float32
    cross_attn: np.ndarray | None  # (N, S) float32


class StepFunction(Protocol):
    """One decoder step over the live rows; see the module docstring for the contract."""

    def __call__(self, tokens: np.ndarray, step: int, reorder: np.ndarray | None, k: int) -> StepOutput: ...


def is_identity(reorder: np.ndarray, previous_rows: int) -> bool:
    """Whether ``reorder`` keeps every previous row where it was (a step function may then skip the gather)."""
    return len(reorder) == previous_rows and bool((reorder == np.arange(previous_rows)).all())


def sentence_blocks(row_sentence: np.ndarray) -> np.ndarray | None:
    """The sentence of each block when the rows come in equal blocks of consecutive rows, one sentence each
    (a static beam search: every live sentence has its beams side by side), else None.

    A step function then feeds one cross-attention K/V per block, which its G rows share (the decoder
    graph's ``sentences`` axis, rows = sentences x G); otherwise one per row (G = 1).
    """
    if len(row_sentence) == 0:
        return row_sentence
    starts = np.flatnonzero(np.r_[True, row_sentence[1:] != row_sentence[:-1]])  # first row of each run
    sizes = np.diff(np.r_[starts, len(row_sentence)])
    return row_sentence[starts] if (sizes == sizes[0]).all() else None


def top_k_rows(log_probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``k`` largest entries of ``log_probs`` (N, V), best first, equal values in index order."""
    k = min(k, log_probs.shape[1])
    part = np.argpartition(-log_probs, k - 1, axis=1)[:, :k] if k < log_probs.shape[1] else None
    candidates = np.broadcast_to(np.arange(log_probs.shape[1]), log_probs.shape) if part is None else part
    values = np.take_along_axis(log_probs, candidates, axis=1)
    order = np.lexsort((candidates, -values), axis=1)  # best first, then the lower id
    ids = np.take_along_axis(candidates, order, axis=1)
    return np.take_along_axis(values, order, axis=1), ids.astype(np.int64)


TableFunction = Callable[[np.ndarray, int, np.ndarray | None], tuple[np.ndarray, np.ndarray | None]]


class FullTableStep:
    """Adapts ``fn(tokens, step, reorder) → (log_probs (N, V), cross_attn)`` to the candidate contract.

    For step functions that compute the whole table anyway (scripted tests, a reference without cache).
    Equal log-probs straddling the k-th place may be cut differently than a graph's TopK would; the
    search's result does not depend on which, unless two hypotheses tie exactly.
    """

    def __init__(self, fn: TableFunction, eos_id: int) -> None:
        self.fn, self.eos_id = fn, eos_id

    def __call__(self, tokens: np.ndarray, step: int, reorder: np.ndarray | None, k: int) -> StepOutput:
        log_probs, cross_attn = self.fn(tokens, step, reorder)
        log_probs = np.asarray(log_probs)
        if log_probs.ndim != 2 or log_probs.shape[0] != len(tokens) or log_probs.shape[1] <= self.eos_id:
            raise ValueError(
                f"step function returned log_probs of shape {log_probs.shape}; expected ({len(tokens)}, V) "
                f"with V > eos_id ({self.eos_id})"
            )
        if np.isnan(log_probs).any():
            raise ValueError("step function returned NaN log probs")
        scores, ids = top_k_rows(log_probs, k)
        return StepOutput(scores, ids, log_probs[:, self.eos_id], cross_attn)


@dataclass(frozen=True)
class Hypothesis:
    """One finished translation of a sentence."""

    tokens: list[int]  # generated tokens, without BOS and without the final EOS
    score: float  # log_prob / lp(len(tokens) + 1): the ranking score
    log_prob: float  # total log probability, the EOS step included
    # (len(tokens), S): the step function's cross-attention row for each token, along this hypothesis's own
    # beam history; None unless requested and provided. Left out of == (arrays have no truth value).
    attention: np.ndarray | None = field(default=None, compare=False)


class _Finished(NamedTuple):
    score: float
    log_prob: float
    call: int  # the step call whose row chose EOS
    row: int  # that row's index in that call
    length: int  # tokens in the hypothesis (the sentence's decoding position at that call)


class _History:
    """Per-call tokens, reorder indices and cross-attention, to trace a finished row back to BOS.

    Calls are numbered from 0; :meth:`forget_before` drops calls no live sentence can reach any more.
    """

    def __init__(self, keep_attention: bool) -> None:
        self.keep_attention = keep_attention
        self.first = 0  # the call number of tokens[0]
        self.tokens: list[np.ndarray] = []
        self.parents: list[np.ndarray | None] = []
        self.attention: list[np.ndarray] = []
        self.src_len = 0

    def record(self, tokens: np.ndarray, reorder: np.ndarray | None, cross_attn: np.ndarray | None) -> None:
        self.tokens.append(tokens)
        self.parents.append(reorder)
        if not self.keep_attention:
            return
        if cross_attn is None:
            # A step function that gives no attention gives none at all: drop what was kept.
            self.keep_attention, self.attention = False, []
            return
        # Copy: an IO-bound step function may hand back the same buffer on every call.
        self.attention.append(np.array(cross_attn, dtype=np.float32))
        self.src_len = self.attention[-1].shape[1]

    def forget_before(self, call: int) -> None:
        drop = call - self.first
        if drop > 0:
            del self.tokens[:drop], self.parents[:drop], self.attention[:drop]
            self.first = call

    def trace(
        self, finished: _Finished, src_len: int | None = None, attention: bool = True
    ) -> tuple[list[int], np.ndarray | None]:
        """Tokens (and attention rows, cut to ``src_len`` columns when given) of a finished hypothesis."""
        tokens: list[int] = []
        rows: list[np.ndarray] = []
        keep = self.keep_attention and attention
        row = finished.row
        for c in range(finished.call - self.first, finished.call - self.first - finished.length, -1):
            tokens.append(int(self.tokens[c][row]))
            row = int(self.parents[c][row])  # type: ignore[index]
            if keep:
                rows.append(self.attention[c - 1][row][:src_len])  # the row that predicted tokens[-1]
        tokens.reverse()
        if not keep:
            return tokens, None
        if not rows:
            return tokens, np.zeros((0, self.src_len if src_len is None else src_len), dtype=np.float32)
        return tokens, np.stack(rows[::-1])


class _Candidates(NamedTuple):
    """The best candidates of every live sentence, sentence by sentence, best first."""

    pos: np.ndarray  # index of the sentence among the live ones
    rank: np.ndarray  # rank within its sentence (0 = best)
    row: np.ndarray  # the row it extends
    token: np.ndarray  # the token it appends
    log_prob: np.ndarray  # cumulative log prob


def _top_candidates(
    row_log_prob: np.ndarray,
    out: StepOutput,
    row_pos: np.ndarray,
    k: np.ndarray,
    ban: list[int],
    eos_id: int,
    eos_banned: np.ndarray,
) -> _Candidates:
    """Up to ``k[pos]`` best finite candidates per sentence from the rows' own best (``out.scores``/``out.ids``).

    A candidate's value is its row's cumulative log prob plus its token's, in float64; candidates are
    ordered by sentence, then best value, ties going to the lower row, then the lower token id. Tokens
    in ``ban``, and EOS on rows where ``eos_banned`` (N,), are dropped (the step returned enough extra
    candidates per row to make up for them).
    """
    n_rows, width = out.ids.shape
    row = np.arange(n_rows * width) // width  # (N * width,) each candidate's row
    token = out.ids.reshape(-1)
    values = row_log_prob[row] + out.scores.reshape(-1).astype(np.float64)
    keep = np.isfinite(values) & ~(eos_banned[row] & (token == eos_id))
    for banned in ban:  # one or two ids: a comparison each is cheaper than np.isin's set machinery
        keep &= token != banned
    row, token, values = row[keep], token[keep], values[keep]
    pos = row_pos[row]
    order = np.lexsort((token, row, -values, pos))  # by sentence, then best value, then row, then token
    pos, row, token, values = pos[order], row[order], token[order], values[order]
    rank = np.arange(pos.size) - np.searchsorted(pos, pos)
    keep = rank < k[pos]
    return _Candidates(pos[keep], rank[keep], row[keep], token[keep].astype(np.int64), values[keep])


def _rank_among(selected: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """For candidates grouped by sentence (``rank`` = index within the group): rank among the selected."""
    cumulative = np.cumsum(selected)
    first = np.arange(selected.size) - rank
    return cumulative - (cumulative[first] - selected[first]) - 1


def _add_finished(sent: _Sentence, entry: _Finished) -> None:
    sent.n_finished += 1
    pool = sent.pool
    pool.append(entry)
    pool.sort(key=lambda f: -f.score)  # stable: an earlier equal score stays ahead
    del pool[sent.options.n_best :]


def _check_outputs(out: object, n_rows: int, k: int) -> StepOutput:
    if not isinstance(out, tuple) or len(out) != 4:
        raise ValueError(f"step function returned {type(out).__name__}; expected a StepOutput")
    scores, ids, eos, attn = (np.asarray(x) if x is not None else None for x in out)
    if scores.shape != ids.shape or scores.ndim != 2 or scores.shape[0] != n_rows or scores.shape[1] > k:
        raise ValueError(
            f"step function returned scores {scores.shape} and ids {ids.shape}; expected ({n_rows}, at most {k}) each"
        )
    if eos.shape != (n_rows,):
        raise ValueError(f"step function returned eos_log_probs of shape {eos.shape}; expected ({n_rows},)")
    if attn is not None and (attn.ndim != 2 or attn.shape[0] != n_rows):
        raise ValueError(f"step function returned cross_attn of shape {attn.shape}; expected ({n_rows}, S)")
    # One reduction per array (a NaN, or +inf against -inf, makes the sum NaN): cheaper than isnan().any().
    if math.isnan(float(scores.sum()) + float(eos.sum())):
        raise ValueError("step function returned NaN (or +inf) log probs")
    return StepOutput(scores, ids, eos, attn)


@dataclass
class _Sentence:
    key: object  # the caller's handle, returned with the hypotheses
    options: DecodingOptions
    max_len: int
    start: int  # the call of its BOS row
    src_len: int | None  # attention columns to keep (its own source with EOS); None keeps the step's width
    pool: list[_Finished] = field(default_factory=list)  # the n_best best finished hypotheses
    n_finished: int = 0  # hypotheses finished so far (the patience rule counts them)


class SearchBatch:
    """The beam search's state over live sentences that may each have their own options and position.

    One step: :meth:`rows` gives the next call's tokens and positions, the step function runs, and
    :meth:`advance` applies its output, returning the sentences that finished (retired at once, rows
    freed). :meth:`admit` adds a sentence at a step boundary: one BOS row after the live rows, at
    position 0. :func:`beam_search` is the special case where every sentence is admitted before the first
    call; a continuous batch (``model.continuous``) admits between calls. Rows are laid out sentence by
    sentence in admission order, best beam first.
    """

    def __init__(
        self,
        *,
        bos_id: int,
        eos_id: int,
        pad_id: int | None = None,
        max_positions: int | None = None,
        keep_attention: bool = True,
    ) -> None:
        self.bos_id, self.eos_id, self.max_positions = bos_id, eos_id, max_positions
        self.banned = [bos_id] if pad_id is None else [bos_id, pad_id]
        self.history = _History(keep_attention)
        self.live: list[_Sentence] = []
        self.call = 0  # the number of the next step call
        self.row_pos = np.zeros(0, dtype=np.int64)  # (N,) each row's index into `live`
        self.row_log_prob = np.zeros(0)  # (N,) cumulative log prob of each row, float64
        self.tokens = np.zeros(0, dtype=np.int64)  # (N,) each row's last token
        self.reorder: np.ndarray | None = None  # for the first rows: the previous call's row each continues
        self.admitted = 0  # rows added since the last call (they come last)

    def admit(self, key: object, src_len: int, options: DecodingOptions, attention_width: int | None = None) -> None:
        """Add one sentence (``src_len`` source tokens, without EOS) for the next call."""
        max_len = int(options.max_lengths([src_len])[0])
        if self.max_positions is not None:
            max_len = min(max_len, self.max_positions - 1)
        self.live.append(_Sentence(key, options, max_len, self.call, attention_width))
        self.row_pos = np.append(self.row_pos, len(self.live) - 1)
        self.row_log_prob = np.append(self.row_log_prob, 0.0)
        self.tokens = np.append(self.tokens, np.int64(self.bos_id))
        self.admitted += 1

    @property
    def n_rows(self) -> int:
        return self.tokens.size

    def positions(self) -> np.ndarray:
        """(N,) each row's decoding position: its sentence's calls so far."""
        starts = np.array([s.start for s in self.live], dtype=np.int64)
        return self.call - starts[self.row_pos]

    def width(self) -> int:
        """Candidates each row must return: a sentence's 2K best survive the banned tokens."""
        return max(
            2 * s.options.beam_size + len(self.banned) + int(self.call - s.start < s.options.min_length)
            for s in self.live
        )

    def advance(self, raw_out: StepOutput, k: int) -> list[tuple[object, list[Hypothesis]]]:
        """Apply one call's output; return the finished sentences' ``(key, hypotheses)``, best first."""
        out = _check_outputs(raw_out, self.tokens.size, k)
        self.history.record(self.tokens, self.reorder, out.cross_attn)
        live, row_pos, call = self.live, self.row_pos, self.call
        steps = np.array([call - s.start for s in live], dtype=np.int64)  # (n_live,)
        max_lens = np.array([s.max_len for s in live], dtype=np.int64)
        beams = np.array([s.options.beam_size for s in live], dtype=np.int64)
        eos_banned = np.array([call - s.start < s.options.min_length for s in live], dtype=bool)[row_pos]
        forced = max_lens <= steps  # (n_live,) sentences at their max length
        for row in np.flatnonzero(forced[row_pos]):
            sent = live[row_pos[row]]
            log_prob = float(self.row_log_prob[row] + out.eos_log_probs[row])
            score = log_prob / float(sent.options.penalty(steps[row_pos[row]] + 1))
            _add_finished(sent, _Finished(score, log_prob, call, int(row), int(steps[row_pos[row]])))

        cand = _top_candidates(self.row_log_prob, out, row_pos, 2 * beams, self.banned, self.eos_id, eos_banned)
        is_eos = cand.token == self.eos_id
        searching = ~forced[cand.pos]
        for i in np.flatnonzero(is_eos & (cand.rank < beams[cand.pos]) & searching):
            sent = live[cand.pos[i]]
            log_prob = float(cand.log_prob[i])
            score = log_prob / float(sent.options.penalty(steps[cand.pos[i]] + 1))
            _add_finished(sent, _Finished(score, log_prob, call, int(cand.row[i]), int(steps[cand.pos[i]])))
        extend = ~is_eos & searching
        extend &= _rank_among(extend, cand.rank) < beams[cand.pos]

        done = forced | _can_stop(live, max_lens, steps, cand.pos[extend], cand.log_prob[extend])
        extend &= ~done[cand.pos]
        self.reorder, self.tokens = cand.row[extend], cand.token[extend]
        self.row_log_prob = cand.log_prob[extend]
        self.row_pos = (np.cumsum(~done) - 1)[cand.pos[extend]]
        retired = [(s.key, [self._hypothesis(s, f) for f in s.pool]) for s, d in zip(live, done, strict=True) if d]
        self.live = [s for s, d in zip(live, done, strict=True) if not d]
        self.call += 1
        self.admitted = 0
        self.history.forget_before(min((s.start for s in self.live), default=self.call))
        return retired

    def drop(self, keys: set) -> np.ndarray | None:
        """Remove the live sentences whose key is in ``keys`` (cancelled) between calls; their rows go at once.

        Returns the kept rows (indices into the current rows) for the step function to gather, or None when
        no live sentence was dropped. Rows admitted since the last call are not live yet: drop before admitting.
        """
        gone = np.array([s.key in keys for s in self.live], dtype=bool)  # (n_live,)
        if not gone.any():
            return None
        if self.admitted:
            raise RuntimeError("drop() between admit() and the next call: drop before admitting")
        kept_rows = np.flatnonzero(~gone[self.row_pos])  # (R',) rows of the sentences that stay
        if self.reorder is not None:
            self.reorder = self.reorder[kept_rows]
        self.tokens = self.tokens[kept_rows]
        self.row_log_prob = self.row_log_prob[kept_rows]
        self.row_pos = (np.cumsum(~gone) - 1)[self.row_pos[kept_rows]]
        self.live = [s for s, g in zip(self.live, gone, strict=True) if not g]
        self.history.forget_before(min((s.start for s in self.live), default=self.call))
        return kept_rows

    def _hypothesis(self, sent: _Sentence, finished: _Finished) -> Hypothesis:
        tokens, attention = self.history.trace(finished, sent.src_len, sent.options.return_attention)
        return Hypothesis(tokens, finished.score, finished.log_prob, attention)


def beam_search(
    step_fn: StepFunction,
    src_lengths: Sequence[int] | np.ndarray,
    *,
    bos_id: int,
    eos_id: int,
    config: DecodingOptions = PAPER,
    pad_id: int | None = None,
    max_positions: int | None = None,
) -> list[list[Hypothesis]]:
    """One list per sentence (input order) of up to ``config.n_best`` hypotheses, best first.

    ``src_lengths`` are source tokens without the EOS the encoder sees. Fewer than ``n_best`` come back
    only when the step function leaves fewer finite-probability hypotheses. ``min_length`` masks EOS
    without renormalising; ``max_length`` wins over it (the forced EOS uses the step function's own EOS
    log prob, so scores stay true log probabilities). BOS (and PAD, when given) are never generated.
    ``max_positions`` (the network's position table) caps every max length at ``max_positions - 1``, so
    the forced EOS step still has a position.
    """
    config.max_lengths(src_lengths)  # validates the lengths
    batch = SearchBatch(
        bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, max_positions=max_positions, keep_attention=config.return_attention
    )
    for i, length in enumerate(np.asarray(src_lengths).tolist()):
        batch.admit(i, int(length), config)
    results: list[list[Hypothesis]] = [[] for _ in range(batch.n_rows)]
    while batch.live:
        width = batch.width()
        reorder = batch.reorder if batch.call else None
        out = step_fn(batch.tokens, batch.call, reorder, width)
        for i, hyps in batch.advance(out, width):
            results[i] = hyps  # type: ignore[index]
    return results


def _can_stop(
    live: list[_Sentence], max_lens: np.ndarray, steps: np.ndarray, beam_pos: np.ndarray, beam_log_prob: np.ndarray
) -> np.ndarray:
    """Which live sentences are done: no beams left, or none can beat their ``n_best``-th finished one (with
    a ``patience``: enough hypotheses finished)."""
    best = np.full(len(live), NEG_INF)
    first = np.ones(beam_pos.size, dtype=bool)  # beams come grouped by sentence, best first
    first[1:] = beam_pos[1:] != beam_pos[:-1]
    best[beam_pos[first]] = beam_log_prob[first]
    done = np.zeros(len(live), dtype=bool)
    groups: dict[DecodingOptions, list[int]] = {}  # sentences at different steps share a group (steps[idx])
    for i, sent in enumerate(live):
        groups.setdefault(sent.options, []).append(i)
    for config, members in groups.items():
        idx = np.array(members)
        n_best = config.n_best
        full = np.array([len(live[i].pool) >= n_best for i in members], dtype=bool)
        if config.beam_size == 1:
            done[idx] = full | (best[idx] == NEG_INF)  # greedy: the argmax path ends at the first EOS
            continue
        if config.patience is not None:  # enough hypotheses finished, whatever the live beams could reach
            enough = np.array([live[i].n_finished for i in members]) >= config.patience_hypotheses()
            done[idx] = enough | (best[idx] == NEG_INF)
            continue
        # (+inf where the pool is not full: those are not done whatever the bound, as ``full`` says)
        nth = np.array([live[i].pool[n_best - 1].score if len(live[i].pool) >= n_best else np.inf for i in members])
        # Log probs only fall from here, and the final |Y| lies in [step + 2, max_len + 1]; lp is monotone in
        # |Y|, so the best reachable score divides by one of the two ends.
        b = best[idx]
        bound = np.maximum(b / config.penalty(steps[idx] + 2), b / config.penalty(max_lens[idx] + 1))
        done[idx] = (b == NEG_INF) | (full & (bound <= nth))
    return done


def greedy_search(
    step_fn: StepFunction,
    src_lengths: Sequence[int] | np.ndarray,
    *,
    bos_id: int,
    eos_id: int,
    config: DecodingOptions = PAPER,
    pad_id: int | None = None,
    max_positions: int | None = None,
) -> list[list[Hypothesis]]:
    """The argmax path of each sentence: :func:`beam_search` with beam size 1 (and n_best 1)."""
    greedy = replace(config, beam_size=1, n_best=1)
    return beam_search(
        step_fn, src_lengths, bos_id=bos_id, eos_id=eos_id, config=greedy, pad_id=pad_id, max_positions=max_positions
    )
