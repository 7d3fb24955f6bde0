"""Beam search and greedy search in numpy over a decoder *step function* (no torch here, ever).

The same search serves training-time BLEU (a torch step function) and the ONNX service (an onnxruntime step
function). The network is reached only through :class:`StepFunction`:

- ``tokens`` (N,) int64: the last token of each live row; ``step`` is its 0-based decoding position.
  On the first call (``step == 0``) there is one row per sentence, in sentence order, each ``bos_id``,
  and ``reorder`` is None.
- ``reorder`` (N,) int64 on later calls: for each row, the row of the *previous* call whose decoder
  state it continues. This one gather does beam reordering, the expansion from one row per sentence to
  the beams, and the dropping of finished sentences (their rows simply do not appear).
- It returns ``log_probs`` (N, V) float32 (log-softmax over the vocabulary) and ``cross_attn`` (N, S)
  float32 or None: each row's attention over the S source positions when predicting the next token.

Rows are laid out sentence by sentence (input order), best beam first. Per step and per sentence the
top 2K candidates (K = beam size) by cumulative log prob are taken, ties going to the lower row, then
the lower token id; EOS candidates among the first K go to the sentence's finished pool, scored with
the GNMT length penalty; the best K non-EOS candidates become the next beams. A sentence stops when its
pool holds ``n_best`` hypotheses and no live beam can still beat the ``n_best``-th of them, or at its
maximum length, where every live beam is finished with EOS. Beam size 1 is greedy decoding: the argmax
path, ending as soon as the argmax is EOS.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple, Protocol

import numpy as np

NEG_INF = -np.inf


class StepFunction(Protocol):
    """One decoder step over the live rows; see the module docstring for the contract."""

    def __call__(
        self, tokens: np.ndarray, step: int, reorder: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray | None]: ...


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


@dataclass(frozen=True)
class SearchConfig:
    """Decoding settings; the defaults are the paper's (beam 4, α = 0.6, max length = source + 50)."""

    beam_size: int = 4
    n_best: int = 1  # hypotheses returned per sentence, at most beam_size
    length_penalty: float = 0.6  # GNMT α: lp(Y) = ((5 + |Y|) / 6) ** α, |Y| counting the final EOS
    max_length_offset: int = 50  # a sentence's max output length is its source length + this
    max_length: int | None = None  # if set, the max output length of every sentence (replaces the above)
    min_length: int = 0  # EOS is forbidden until this many tokens were generated
    return_attention: bool = False

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError("invalid search config: " + "; ".join(problems))

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
        if not isinstance(self.return_attention, bool):
            out.append(f"return_attention must be a bool, got {self.return_attention!r}")
        return out

    def penalty(self, length: int | np.ndarray) -> float | np.ndarray:
        """The GNMT length penalty lp(|Y|) = ((5 + |Y|) / 6) ** α."""
        return ((5.0 + np.asarray(length, dtype=np.float64)) / 6.0) ** self.length_penalty

    def max_lengths(self, src_lengths: Sequence[int] | np.ndarray) -> np.ndarray:
        """Each sentence's max output length (tokens before EOS): ``max_length`` or source + offset."""
        lengths = np.asarray(src_lengths)
        if lengths.ndim != 1 or (lengths.size and lengths.dtype.kind not in "iu") or (lengths < 0).any():
            raise ValueError(f"src_lengths must be a 1-D sequence of integers >= 0, got {src_lengths!r}")
        if self.max_length is not None:
            return np.full(lengths.shape, self.max_length, dtype=np.int64)
        return lengths.astype(np.int64) + self.max_length_offset


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
    step: int  # the call whose row chose EOS; the hypothesis has `step` tokens
    row: int  # that row's index in that call


class _History:
    """Per-call tokens, reorder indices and cross-attention, to trace a finished row back to BOS."""

    def __init__(self, keep_attention: bool) -> None:
        self.keep_attention = keep_attention
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

    def trace(self, step: int, row: int) -> tuple[list[int], np.ndarray | None]:
        """Tokens (and attention rows) of the hypothesis that chose EOS at ``row`` of call ``step``."""
        tokens: list[int] = []
        rows: list[np.ndarray] = []
        for s in range(step, 0, -1):
            tokens.append(int(self.tokens[s][row]))
            row = int(self.parents[s][row])  # type: ignore[index]
            if self.keep_attention:
                rows.append(self.attention[s - 1][row])  # the row that predicted tokens[-1]
        tokens.reverse()
        if not self.keep_attention:
            return tokens, None
        if not rows:
            return tokens, np.zeros((0, self.src_len), dtype=np.float32)
        return tokens, np.stack(rows[::-1])


class _Candidates(NamedTuple):
    """The best candidates of every live sentence, sentence by sentence, best first."""

    pos: np.ndarray  # index of the sentence among the live ones
    rank: np.ndarray  # rank within its sentence (0 = best)
    row: np.ndarray  # the row it extends
    token: np.ndarray  # the token it appends
    log_prob: np.ndarray  # cumulative log prob


def _sentence_grid(scores: np.ndarray, row_pos: np.ndarray, n_live: int) -> tuple[np.ndarray, np.ndarray]:
    """Lay ``scores`` (N, V), rows grouped by sentence, out as (n_live, R * V), with each sentence's first row.

    With the same number R of rows in every sentence (the usual case) this is a reshape, no copy;
    otherwise the missing rows are padded with -inf.
    """
    n_rows, vocab = scores.shape
    counts = np.bincount(row_pos, minlength=n_live)  # live rows per sentence
    starts = np.cumsum(counts) - counts
    width = int(counts.max())
    if (counts == width).all():
        return scores.reshape(n_live, width * vocab), starts
    grid = np.full((n_live, width, vocab), NEG_INF, dtype=scores.dtype)
    grid[row_pos, np.arange(n_rows) - starts[row_pos]] = scores
    return grid.reshape(n_live, width * vocab), starts


def _kth_best_lower_bound(grid: np.ndarray, k: int) -> np.ndarray:
    """A value at or below the k-th largest entry of each row of ``grid`` (NaN if the row has NaN).

    Partitioning a whole (n, R * V) grid is the cost of a search step, so the partition runs over the
    maxima of groups of up to 32 entries instead: k of those maxima are k real entries, so their k-th
    largest is a lower bound, and an exact one unless two of the top k share a group.
    """
    n, width = grid.shape
    if k >= width:
        return np.full(n, np.nan if np.isnan(grid).any() else NEG_INF, dtype=grid.dtype)
    fold = max(1, min(32, width // (4 * k)))
    if fold > 1:
        body = width - width % fold
        folded = grid[:, :body].reshape(n, fold, body // fold).max(axis=1)  # NaN propagates
        grid = np.concatenate([folded, grid[:, body:]], axis=1)
    return np.partition(grid, grid.shape[1] - k, axis=1)[:, -k:].min(axis=1)  # NaN sorts last


def _top_candidates(
    row_log_prob: np.ndarray, log_probs: np.ndarray, row_pos: np.ndarray, n_live: int, k: int, ban: list[int]
) -> _Candidates:
    """Up to ``k`` best finite candidates per sentence: row ``row_log_prob`` (N,) plus ``log_probs`` (N, V).

    Vectorised over all sentences: everything at or above a cheap lower bound of each sentence's k-th best
    score is sorted. The (N, V) comparison runs in float32, like the network's own output; the chosen
    candidates are ordered by their float64 sums, ties going to the lower row, then the lower token id.
    Tokens in ``ban`` are excluded.
    """
    vocab = log_probs.shape[1]
    scores = np.add(row_log_prob.astype(np.float32)[:, None], log_probs, dtype=np.float32)  # (N, V)
    scores[:, ban] = NEG_INF
    grid, starts = _sentence_grid(scores, row_pos, n_live)  # (n_live, R * V)
    threshold = _kth_best_lower_bound(grid, k)
    if np.isnan(threshold).any():
        raise ValueError("step function returned NaN log probs")
    mask = grid >= threshold[:, None]
    if (threshold == NEG_INF).any():
        mask &= grid > NEG_INF
    pos, flat = np.divmod(np.flatnonzero(mask), grid.shape[1])  # k or a few more: cut below
    row, token = starts[pos] + flat // vocab, flat % vocab
    values = row_log_prob[row] + log_probs[row, token].astype(np.float64)
    order = np.lexsort((flat, -values, pos))  # by sentence, then best value, then row, then token
    pos, row, token, values = pos[order], row[order], token[order], values[order]
    rank = np.arange(pos.size) - np.searchsorted(pos, pos)
    keep = rank < k
    return _Candidates(pos[keep], rank[keep], row[keep], token[keep].astype(np.int64), values[keep])


def _rank_among(selected: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """For candidates grouped by sentence (``rank`` = index within the group): rank among the selected."""
    cumulative = np.cumsum(selected)
    first = np.arange(selected.size) - rank
    return cumulative - (cumulative[first] - selected[first]) - 1


def _add_finished(pool: list[_Finished], entry: _Finished, n_best: int) -> None:
    pool.append(entry)
    pool.sort(key=lambda f: -f.score)  # stable: an earlier equal score stays ahead
    del pool[n_best:]


def _check_outputs(log_probs: object, cross_attn: object, n_rows: int, eos_id: int) -> np.ndarray:
    log_probs = np.asarray(log_probs)
    if log_probs.ndim != 2 or log_probs.shape[0] != n_rows or log_probs.shape[1] <= eos_id:
        raise ValueError(
            f"step function returned log_probs of shape {log_probs.shape}; expected ({n_rows}, V) "
            f"with V > eos_id ({eos_id})"
        )
    if cross_attn is not None and (np.ndim(cross_attn) != 2 or np.shape(cross_attn)[0] != n_rows):
        shape = np.shape(cross_attn)
        raise ValueError(f"step function returned cross_attn of shape {shape}; expected ({n_rows}, S)")
    return log_probs


def beam_search(
    step_fn: StepFunction,
    src_lengths: Sequence[int] | np.ndarray,
    *,
    bos_id: int,
    eos_id: int,
    config: SearchConfig = SearchConfig(),
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
    max_lens = config.max_lengths(src_lengths)  # (B,)
    if max_positions is not None:
        max_lens = np.minimum(max_lens, max_positions - 1)
    banned = [bos_id] if pad_id is None else [bos_id, pad_id]
    n_sent, k, n_best = max_lens.size, config.beam_size, config.n_best
    pools: list[list[_Finished]] = [[] for _ in range(n_sent)]
    history = _History(config.return_attention)
    live = np.arange(n_sent)  # sentences still searching, input order
    row_pos = np.arange(n_sent)  # (N,) each row's index into `live`
    row_log_prob = np.zeros(n_sent)  # (N,) cumulative log prob of each row, float64
    tokens = np.full(n_sent, bos_id, dtype=np.int64)
    reorder: np.ndarray | None = None
    step = 0
    while live.size:
        log_probs, cross_attn = step_fn(tokens, step, reorder)
        log_probs = _check_outputs(log_probs, cross_attn, tokens.size, eos_id)  # (N, V)
        history.record(tokens, reorder, cross_attn)
        forced = max_lens[live] <= step  # (n_live,) sentences at their max length
        for row in np.flatnonzero(forced[row_pos]):
            log_prob = float(row_log_prob[row] + log_probs[row, eos_id])
            score = log_prob / float(config.penalty(step + 1))
            pool = pools[live[row_pos[row]]]
            _add_finished(pool, _Finished(score, log_prob, step, int(row)), n_best)

        ban = [*banned, eos_id] if step < config.min_length else banned
        cand = _top_candidates(row_log_prob, log_probs, row_pos, live.size, 2 * k, ban)
        is_eos = cand.token == eos_id
        searching = ~forced[cand.pos]
        for i in np.flatnonzero(is_eos & (cand.rank < k) & searching):
            log_prob = float(cand.log_prob[i])
            score = log_prob / float(config.penalty(step + 1))
            pool = pools[live[cand.pos[i]]]
            _add_finished(pool, _Finished(score, log_prob, step, int(cand.row[i])), n_best)
        extend = ~is_eos & searching
        extend &= _rank_among(extend, cand.rank) < k

        done = forced | _can_stop(config, pools, live, max_lens, cand.pos[extend], cand.log_prob[extend], step)
        extend &= ~done[cand.pos]
        reorder, tokens = cand.row[extend], cand.token[extend]
        row_log_prob = cand.log_prob[extend]
        row_pos = (np.cumsum(~done) - 1)[cand.pos[extend]]
        live = live[~done]
        step += 1
    return [[_hypothesis(f, history) for f in pool] for pool in pools]


def _can_stop(
    config: SearchConfig,
    pools: list[list[_Finished]],
    live: np.ndarray,
    max_lens: np.ndarray,
    beam_pos: np.ndarray,
    beam_log_prob: np.ndarray,
    step: int,
) -> np.ndarray:
    """Which live sentences are done: no beams left, or none can beat their ``n_best``-th finished one."""
    best = np.full(live.size, NEG_INF)
    first = np.ones(beam_pos.size, dtype=bool)  # beams come grouped by sentence, best first
    first[1:] = beam_pos[1:] != beam_pos[:-1]
    best[beam_pos[first]] = beam_log_prob[first]
    n_best = config.n_best
    full = np.array([len(pools[s]) >= n_best for s in live], dtype=bool)
    if config.beam_size == 1:
        return full | (best == NEG_INF)  # greedy: the argmax path ends at the first EOS
    nth = np.array([pools[s][n_best - 1].score if len(pools[s]) >= n_best else np.nan for s in live])
    # Log probs only fall from here, and the final |Y| lies in [step + 2, max_len + 1]; lp is monotone in
    # |Y|, so the best reachable score divides by one of the two ends.
    with np.errstate(invalid="ignore"):
        bound = np.maximum(best / config.penalty(step + 2), best / config.penalty(max_lens[live] + 1))
        return (best == NEG_INF) | (full & (bound <= nth))


def _hypothesis(finished: _Finished, history: _History) -> Hypothesis:
    tokens, attention = history.trace(finished.step, finished.row)
    return Hypothesis(tokens, finished.score, finished.log_prob, attention)


def greedy_search(
    step_fn: StepFunction,
    src_lengths: Sequence[int] | np.ndarray,
    *,
    bos_id: int,
    eos_id: int,
    config: SearchConfig = SearchConfig(),
    pad_id: int | None = None,
    max_positions: int | None = None,
) -> list[list[Hypothesis]]:
    """The argmax path of each sentence: :func:`beam_search` with beam size 1 (and n_best 1)."""
    greedy = replace(config, beam_size=1, n_best=1)
    return beam_search(
        step_fn, src_lengths, bos_id=bos_id, eos_id=eos_id, config=greedy, pad_id=pad_id, max_positions=max_positions
    )
