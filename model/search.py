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
maximum length, where every live beam is finished with EOS. Beam size 1 is greedy decoding: the argmax
path, ending as soon as the argmax is EOS.
"""

from __future__ import annotations

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


def _top_candidates(
    row_log_prob: np.ndarray, out: StepOutput, row_pos: np.ndarray, k: int, ban: list[int]
) -> _Candidates:
    """Up to ``k`` best finite candidates per sentence from the rows' own best (``out.scores``/``out.ids``).

    A candidate's value is its row's cumulative log prob plus its token's, in float64; candidates are
    ordered by sentence, then best value, ties going to the lower row, then the lower token id. Tokens
    in ``ban`` are dropped (the step returned enough extra candidates per row to make up for them).
    """
    n_rows, width = out.ids.shape
    row = np.repeat(np.arange(n_rows), width)
    token = out.ids.reshape(-1)
    values = row_log_prob[row] + out.scores.reshape(-1).astype(np.float64)
    keep = np.isfinite(values) & ~np.isin(token, ban)
    row, token, values = row[keep], token[keep], values[keep]
    pos = row_pos[row]
    order = np.lexsort((token, row, -values, pos))  # by sentence, then best value, then row, then token
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
    if np.isnan(scores).any() or np.isnan(eos).any():
        raise ValueError("step function returned NaN log probs")
    return StepOutput(scores, ids, eos, attn)


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
        ban = [*banned, eos_id] if step < config.min_length else banned
        width = 2 * k + len(ban)  # candidates per row: a sentence's 2K best survive the banned ones
        out = _check_outputs(step_fn(tokens, step, reorder, width), tokens.size, width)
        history.record(tokens, reorder, out.cross_attn)
        forced = max_lens[live] <= step  # (n_live,) sentences at their max length
        for row in np.flatnonzero(forced[row_pos]):
            log_prob = float(row_log_prob[row] + out.eos_log_probs[row])
            score = log_prob / float(config.penalty(step + 1))
            pool = pools[live[row_pos[row]]]
            _add_finished(pool, _Finished(score, log_prob, step, int(row)), n_best)

        cand = _top_candidates(row_log_prob, out, row_pos, 2 * k, ban)
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
    config: DecodingOptions,
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
    config: DecodingOptions = PAPER,
    pad_id: int | None = None,
    max_positions: int | None = None,
) -> list[list[Hypothesis]]:
    """The argmax path of each sentence: :func:`beam_search` with beam size 1 (and n_best 1)."""
    greedy = replace(config, beam_size=1, n_best=1)
    return beam_search(
        step_fn, src_lengths, bos_id=bos_id, eos_id=eos_id, config=greedy, pad_id=pad_id, max_positions=max_positions
    )
