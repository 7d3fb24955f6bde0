"""Beam and greedy search against scripted step functions: exact tokens, scores, reorders and attention.

A scripted step function replays a fixed next-token distribution per (sentence, prefix) and follows its
rows through ``reorder`` exactly as a decoder cache would, so every expected answer is worked out by hand
(or, in the exhaustive test, by enumerating every sequence).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import pytest

from model.decoding import DecodingOptions
from model.search import FullTableStep, Hypothesis, StepOutput, _top_candidates, sentence_blocks, top_k_rows
from model.search import beam_search as candidate_beam_search
from model.search import greedy_search as candidate_greedy_search

PAD, UNK, BOS, EOS, A, B = range(6)


def beam_search(step_fn, *args, eos_id: int, **kwargs):
    """The search over a scripted full-table step function, through the candidate contract's adapter."""
    return candidate_beam_search(FullTableStep(step_fn, eos_id), *args, eos_id=eos_id, **kwargs)


def greedy_search(step_fn, *args, eos_id: int, **kwargs):
    return candidate_greedy_search(FullTableStep(step_fn, eos_id), *args, eos_id=eos_id, **kwargs)


V = 6
S = 3  # padded source length seen by the scripted attention

Prefix = tuple[int, ...]
Table = dict[Prefix, dict[int, float]]


@dataclass
class Call:
    step: int
    tokens: list[int]
    reorder: list[int] | None
    sentences: list[int]  # the sentence of each row, as tracked through `reorder`


@dataclass
class ScriptedStep:
    """Next-token probabilities per (sentence, prefix); a prefix missing from a table gets `default`."""

    tables: list[Table]
    default: dict[int, float] = field(default_factory=lambda: {EOS: 1.0})
    attention: dict[Prefix, list[float]] | None = None  # per prefix; others get a uniform row
    calls: list[Call] = field(default_factory=list)
    rows: list[tuple[int, Prefix]] = field(default_factory=list)

    def __call__(
        self, tokens: np.ndarray, step: int, reorder: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        assert tokens.dtype == np.int64 and tokens.ndim == 1
        if reorder is None:
            assert step == 0 and len(tokens) == len(self.tables) and (tokens == BOS).all()
            self.rows = [(i, ()) for i in range(len(tokens))]
        else:
            assert reorder.dtype == np.int64 and reorder.shape == tokens.shape
            parents = [self.rows[r] for r in reorder]
            self.rows = [(s, (*prefix, int(t))) for (s, prefix), t in zip(parents, tokens, strict=True)]
        assert all(len(prefix) == step for _, prefix in self.rows)
        sentences = [s for s, _ in self.rows]
        reorder_list = None if reorder is None else reorder.tolist()
        self.calls.append(Call(step, tokens.tolist(), reorder_list, sentences))
        probs = np.zeros((len(tokens), V))
        for i, (s, prefix) in enumerate(self.rows):
            for token, p in self.tables[s].get(prefix, self.default).items():
                probs[i, token] = p
        with np.errstate(divide="ignore"):
            log_probs = np.log(probs).astype(np.float32)
        if self.attention is None:
            return log_probs, None
        attn = [self.attention.get(prefix, [1 / S] * S) for _, prefix in self.rows]
        return log_probs, np.array(attn, dtype=np.float32)


def lp(length: int, alpha: float = 0.6) -> float:
    return ((5 + length) / 6) ** alpha


def run(tables: list[Table], config: DecodingOptions, src_lengths: list[int] | None = None, **kw):
    step_fn = ScriptedStep(tables, **kw)
    lengths = [5] * len(tables) if src_lengths is None else src_lengths
    return beam_search(step_fn, lengths, bos_id=BOS, eos_id=EOS, config=config), step_fn


def summary(hyps: list[Hypothesis]) -> list[tuple[list[int], float, float]]:
    return [(h.tokens, h.score, h.log_prob) for h in hyps]


# Beam 2 finds [B] (0.4 * 0.9 = 0.36); greedy follows A (0.6), then A (0.4): 0.24.
MISSED_BY_GREEDY: Table = {
    (): {A: 0.6, B: 0.4},
    (A,): {A: 0.4, B: 0.3, EOS: 0.3},
    (B,): {EOS: 0.9, A: 0.1},
}


def test_greedy_follows_the_argmax_path():
    table = {(): {A: 0.5, B: 0.3, EOS: 0.2}, (A,): {B: 0.7, EOS: 0.3}, (A, B): {EOS: 0.9, A: 0.1}}
    log_prob = math.log(0.5) + math.log(0.7) + math.log(0.9)
    (beam_one,), _ = run([table], DecodingOptions(beam_size=1))
    # greedy_search overrides beam_size and n_best, keeping the rest of the config.
    (greedy,) = greedy_search(
        ScriptedStep([table]), [5], bos_id=BOS, eos_id=EOS, config=DecodingOptions(beam_size=3, n_best=2)
    )
    for hyps in (beam_one, greedy):
        assert len(hyps) == 1
        assert hyps[0].tokens == [A, B]
        assert hyps[0].log_prob == pytest.approx(log_prob, rel=1e-6)
        assert hyps[0].score == pytest.approx(log_prob / lp(3), rel=1e-6)


def test_greedy_ends_at_an_argmax_eos_even_if_a_longer_path_scores_better():
    # With α = 1, [A] would score log(0.38) / (7/6) = -0.829 > log(0.4) = -0.916; greedy still stops.
    table = {(): {EOS: 0.4, A: 0.38, B: 0.22}}
    (hyps,), step_fn = run([table], DecodingOptions(beam_size=1, length_penalty=1.0))
    assert summary(hyps) == [([], pytest.approx(math.log(0.4)), pytest.approx(math.log(0.4)))]
    assert len(step_fn.calls) == 1
    (beam,), _ = run([table], DecodingOptions(beam_size=2, length_penalty=1.0))
    assert beam[0].tokens == [A]
    assert beam[0].score == pytest.approx(math.log(0.38) / lp(2, 1.0), rel=1e-6)


def test_beam_finds_a_path_greedy_misses():
    (greedy,), _ = run([MISSED_BY_GREEDY], DecodingOptions(beam_size=1))
    assert greedy[0].tokens == [A, A]
    assert greedy[0].log_prob == pytest.approx(math.log(0.6 * 0.4), rel=1e-6)
    (beam,), _ = run([MISSED_BY_GREEDY], DecodingOptions(beam_size=2))
    assert beam[0].tokens == [B]
    assert beam[0].log_prob == pytest.approx(math.log(0.4 * 0.9), rel=1e-6)
    assert beam[0].score == pytest.approx(math.log(0.36) / lp(2), rel=1e-6)


def test_ties_go_to_the_lower_row_then_the_lower_token():
    half = {A: 0.5, B: 0.5}
    table: Table = {(): half, (A,): half, (B,): half}
    config = DecodingOptions(beam_size=2, n_best=2, length_penalty=0.0)
    first, step_fn = run([table], config)
    second, _ = run([table], config)
    assert summary(first[0]) == summary(second[0])
    # Step 0: A before B. Step 1: all four continuations tie at 0.25, so both beams extend row 0 (A).
    assert step_fn.calls[1].reorder == [0, 0] and step_fn.calls[1].tokens == [A, B]
    assert step_fn.calls[2].reorder == [0, 0] and step_fn.calls[2].tokens == [A, B]
    assert [h.tokens for h in first[0]] == [[A, A], [A, B]]
    assert [h.score for h in first[0]] == pytest.approx([math.log(0.25)] * 2, rel=1e-6)
    (greedy,), _ = run([table], DecodingOptions(beam_size=1))
    assert greedy[0].tokens == [A, A]


def test_tied_candidates_rank_by_row_then_token_whatever_order_the_step_lists_them_in():
    """A step may list a row's tied candidates in any order (a higher id first here): the ranking is still by
    value, then the lower row, then the lower token id."""
    out = StepOutput(
        scores=np.array([[-1.0, -1.0, -2.0], [-1.0, -3.0, -3.0]], dtype=np.float32),
        ids=np.array([[B, A, EOS], [A, B, EOS]]),
        eos_log_probs=np.array([-2.0, -3.0], dtype=np.float32),
        cross_attn=None,
    )
    cand = _top_candidates(np.zeros(2), out, np.array([0, 0]), np.array([6]), [BOS], EOS, np.zeros(2, dtype=bool))
    assert list(zip(cand.row.tolist(), cand.token.tolist(), strict=True)) == [
        (0, A), (0, B), (1, A), (0, EOS), (1, EOS), (1, B)
    ]  # fmt: skip
    assert cand.rank.tolist() == list(range(6))


def test_eos_as_first_token_gives_an_empty_hypothesis():
    table = {(): {EOS: 0.7, A: 0.3}}
    (hyps,), _ = run([table], DecodingOptions(beam_size=4, n_best=2))
    assert hyps[0].tokens == []
    assert hyps[0].log_prob == pytest.approx(math.log(0.7), rel=1e-6)
    assert hyps[0].score == pytest.approx(math.log(0.7) / lp(1), rel=1e-6)  # |Y| = 1: lp = 1
    assert hyps[1].tokens == [A]
    assert hyps[1].score == pytest.approx(math.log(0.3) / lp(2), rel=1e-6)


def test_length_penalty_reorders_short_and_long_hypotheses():
    # [A] has probability 0.55 (|Y| = 2); [B, B, B, B, B] has 0.45 (|Y| = 6).
    table: Table = {(): {A: 0.55, B: 0.45}, (A,): {EOS: 1.0}}
    table.update({(B,) * n: {B: 1.0} for n in range(1, 5)})
    short, long = math.log(0.55), math.log(0.45)
    (hyps,), step_fn = run([table], DecodingOptions(beam_size=2, n_best=1, length_penalty=0.0))
    assert summary(hyps) == [([A], pytest.approx(short), pytest.approx(short))]
    assert len(step_fn.calls) == 2  # with α = 0 the B beam (0.45 < 0.55) cannot win: stop
    (hyps,), _ = run([table], DecodingOptions(beam_size=2, n_best=2, length_penalty=1.0))
    assert [h.tokens for h in hyps] == [[B] * 5, [A]]
    assert [h.score for h in hyps] == pytest.approx([long / (11 / 6), short / (7 / 6)], rel=1e-6)
    assert [h.log_prob for h in hyps] == pytest.approx([long, short], rel=1e-6)


def test_n_best_returns_distinct_hypotheses_best_first():
    table: Table = {
        (): {A: 0.5, B: 0.3, EOS: 0.2},
        (A,): {EOS: 0.6, A: 0.4},
        (B,): {EOS: 0.5, B: 0.5},
    }
    (hyps,), _ = run([table], DecodingOptions(beam_size=3, n_best=3))
    # All five hypotheses get finished; [] (log(0.2) / lp(1) = -1.609) just misses the top three.
    expected = [
        ([A], math.log(0.5 * 0.6) / lp(2)),  # -1.098
        ([A, A], math.log(0.5 * 0.4) / lp(3)),  # -1.354
        ([B, B], math.log(0.3 * 0.5) / lp(3)),  # -1.596
    ]
    assert [h.tokens for h in hyps] == [tokens for tokens, _ in expected]
    assert [h.score for h in hyps] == pytest.approx([score for _, score in expected], rel=1e-6)
    assert len({tuple(h.tokens) for h in hyps}) == 3
    with pytest.raises(ValueError, match="n_best"):
        DecodingOptions(beam_size=2, n_best=3)


def test_batch_equals_each_sentence_alone_and_drops_finished_rows():
    long_a: Table = {(): {A: 0.6, B: 0.4}, (A,): {A: 0.7, EOS: 0.3}, (A, A): {B: 0.8, EOS: 0.2}}
    finishes: Table = {(): {EOS: 0.95, A: 0.05}}  # done after the first call
    long_b: Table = {(): {B: 0.5, A: 0.5}, (B,): {B: 0.9, A: 0.1}, (B, B): {B: 0.6, EOS: 0.4}}
    one_path: Table = {(): {A: 1.0}, (A,): {A: 1.0}}  # a single live beam beside the others' two
    tables = [long_a, finishes, long_b, one_path]
    config = DecodingOptions(beam_size=2)
    batch, step_fn = run(tables, config)
    for sentence, table in enumerate(tables):
        (alone,), _ = run([table], config)
        assert summary(batch[sentence]) == summary(alone)
    assert batch[1][0].tokens == []
    assert step_fn.calls[0].reorder is None and step_fn.calls[0].tokens == [BOS] * 4
    # Step 1: sentences 0 and 2 expand from their single rows (0 and 2) to two beams; sentence 1 is gone.
    assert step_fn.calls[1].reorder == [0, 0, 2, 2, 3]
    assert step_fn.calls[1].sentences == [0, 0, 2, 2, 3]
    assert all(1 not in call.sentences for call in step_fn.calls[1:])


def test_max_length_forces_eos():
    never_eos = {A: 0.7, B: 0.2, EOS: 0.1}
    config = DecodingOptions(beam_size=1, max_length_offset=2)
    hyps, step_fn = run([{}, {}], config, src_lengths=[1, 3], default=never_eos)
    assert [h[0].tokens for h in hyps] == [[A] * 3, [A] * 5]
    assert hyps[1][0].log_prob == pytest.approx(5 * math.log(0.7) + math.log(0.1), rel=1e-6)
    assert [call.sentences for call in step_fn.calls][-2:] == [[1], [1]]
    hyps, _ = run([{}, {}], DecodingOptions(beam_size=2, max_length=4), src_lengths=[1, 30], default=never_eos)
    assert [len(h[0].tokens) for h in hyps] == [4, 4]
    assert hyps[0][0].log_prob == pytest.approx(4 * math.log(0.7) + math.log(0.1), rel=1e-6)


def test_min_length_forbids_early_eos():
    table: Table = {(): {EOS: 0.6, A: 0.4}, (A,): {EOS: 0.5, A: 0.5}}
    (hyps,), _ = run([table], DecodingOptions(beam_size=1))
    assert hyps[0].tokens == []
    (hyps,), _ = run([table], DecodingOptions(beam_size=1, min_length=2))
    assert hyps[0].tokens == [A, A]
    assert hyps[0].log_prob == pytest.approx(math.log(0.4) + math.log(0.5), rel=1e-6)  # not renormalised
    (hyps,), _ = run([table], DecodingOptions(beam_size=3, n_best=3, min_length=1))
    assert all(len(h.tokens) >= 1 for h in hyps)
    # A max length below min_length wins: EOS is forced after one token, with its true probability 0.5.
    (hyps,), _ = run([table], DecodingOptions(beam_size=1, min_length=3, max_length_offset=1), src_lengths=[0])
    assert hyps[0].tokens == [A]
    assert hyps[0].log_prob == pytest.approx(math.log(0.4) + math.log(0.5), rel=1e-6)


def test_attention_follows_each_hypothesis_history():
    # [B, A] (0.38) comes from row 1 of step 1 and moves to row 0 of step 2, so rows swap on the way.
    # The row of (B, A) is the one predicting EOS: it is dropped, one attention row per token.
    table: Table = {(): {A: 0.6, B: 0.4}, (A,): {A: 0.5, B: 0.5}, (B,): {A: 0.95, EOS: 0.05}}
    attention = {(): [0.7, 0.2, 0.1], (A,): [0.1, 0.8, 0.1], (B,): [0.2, 0.2, 0.6], (B, A): [0, 0, 1]}
    config = DecodingOptions(beam_size=2, n_best=2, return_attention=True)
    (hyps,), step_fn = run([table], config, attention=attention)
    assert step_fn.calls[2].reorder == [1, 0] and step_fn.calls[2].tokens == [A, A]
    assert [h.tokens for h in hyps] == [[B, A], [A, A]]
    assert hyps[0].score == pytest.approx(math.log(0.38) / lp(3), rel=1e-6)
    assert hyps[0].attention.dtype == np.float32 and hyps[0].attention.shape == (2, S)
    np.testing.assert_array_equal(hyps[0].attention, np.array([attention[()], attention[(B,)]], np.float32))
    np.testing.assert_array_equal(hyps[1].attention, np.array([attention[()], attention[(A,)]], np.float32))

    (plain,), _ = run([table], DecodingOptions(beam_size=2, n_best=2), attention=attention)
    assert all(h.attention is None for h in plain)
    assert summary(plain) == summary(hyps)
    (no_attention,), _ = run([table], config)  # requested, but the step function gives none
    assert all(h.attention is None for h in no_attention)
    (empty,), _ = run([{(): {EOS: 1.0}}], config, attention=attention)
    assert empty[0].tokens == [] and empty[0].attention.shape == (0, S)


def test_attention_survives_a_step_function_that_reuses_its_buffer():
    table: Table = {(): {A: 0.6, B: 0.4}, (A,): {B: 0.9, EOS: 0.1}}
    attention = {(): [0.7, 0.2, 0.1], (A,): [0.1, 0.8, 0.1]}
    scripted = ScriptedStep([table], attention=attention)
    buffer = np.zeros((8, S), dtype=np.float32)

    def reusing(tokens, step, reorder):
        log_probs, attn = scripted(tokens, step, reorder)
        buffer[: len(attn)] = attn
        return log_probs, buffer[: len(attn)]

    config = DecodingOptions(beam_size=2, return_attention=True)
    (hyps,) = beam_search(reusing, [4], bos_id=BOS, eos_id=EOS, config=config)
    assert hyps[0].tokens == [A, B]
    np.testing.assert_array_equal(hyps[0].attention, np.array([attention[()], attention[(A,)]], np.float32))


def test_search_stops_once_no_live_beam_can_win():
    # After step 1, [A] (0.855) is finished; the best live beam has 0.1, and even divided by lp(max) it
    # cannot reach log(0.855) / lp(2). Without the bound the default (never EOS) would run 50 more steps.
    table: Table = {(): {A: 0.9, B: 0.1}, (A,): {EOS: 0.95, A: 0.05}}
    (hyps,), step_fn = run([table], DecodingOptions(beam_size=2), default={A: 0.5, B: 0.5})
    assert hyps[0].tokens == [A]
    assert len(step_fn.calls) == 2
    # A live beam that can still win keeps the search going: with α = 1 and max length 3, [A] has the bound
    # log(0.5) / lp(4) > log(0.5) = the score of [], and indeed [A, A, A] (0.5, |Y| = 4) wins at the end.
    table = {(): {EOS: 0.5, A: 0.5}, (A,): {A: 1.0}, (A, A): {A: 1.0}, (A, A, A): {EOS: 1.0}}
    (hyps,), step_fn = run([table], DecodingOptions(beam_size=2, length_penalty=1.0, max_length=3))
    assert len(step_fn.calls) == 4
    assert [h.tokens for h in hyps] == [[A, A, A]]
    assert hyps[0].score == pytest.approx(math.log(0.5) / lp(4, 1.0), rel=1e-6)

    # The bound divides by lp(max_length + 1), the forced EOS included: [A, A] (0.45, |Y| = 3) scores
    # log(0.45) / (8/6) = -0.599 > log(0.52) = -0.654, while log(0.45) / lp(2) = -0.684 would have stopped.
    table = {(): {EOS: 0.52, A: 0.45, B: 0.03}, (A,): {A: 1.0}, (A, A): {EOS: 1.0}}
    (hyps,), step_fn = run([table], DecodingOptions(beam_size=2, length_penalty=1.0, max_length=2))
    assert len(step_fn.calls) == 3
    assert hyps[0].tokens == [A, A]
    assert hyps[0].score == pytest.approx(math.log(0.45) / lp(3, 1.0), rel=1e-6)


def test_patience_stops_once_enough_hypotheses_finished():
    # Beam 2, α = 1. [] finishes at step 0 (0.3) and [A] at step 1 (0.7 * 0.5): two finished hypotheses, so
    # patience 1 stops there with [A] (score log(0.35) / lp(2)). The exact rule goes on, since [A, A]
    # (0.35 live, |Y| >= 3 ahead) can still win, and finds [A, A] ending at 0.35 * 0.9: score log(0.315) / lp(3).
    table: Table = {(): {EOS: 0.3, A: 0.7}, (A,): {EOS: 0.5, A: 0.5}, (A, A): {EOS: 0.9, A: 0.1}}
    (exact,), exact_fn = run([table], DecodingOptions(beam_size=2, length_penalty=1.0))
    (patient,), patient_fn = run([table], DecodingOptions(beam_size=2, length_penalty=1.0, patience=1.0))
    assert len(patient_fn.calls) == 2 and patient[0].tokens == [A]
    assert patient[0].score == pytest.approx(math.log(0.35) / lp(2, 1.0), rel=1e-6)
    assert len(exact_fn.calls) > 2 and exact[0].tokens == [A, A]
    assert exact[0].score == pytest.approx(math.log(0.315) / lp(3, 1.0), rel=1e-6)
    # Patience 2 waits for four hypotheses: [A, A] among them, so it agrees with the exact rule here.
    (longer,), longer_fn = run([table], DecodingOptions(beam_size=2, length_penalty=1.0, patience=2.0))
    assert longer[0].tokens == [A, A] and len(longer_fn.calls) > 2


def test_exhaustive_search_agrees_with_enumeration():
    # With beam 16 over {A, B, EOS} and max length 3 no candidate is ever cut, so beam search must return
    # all 15 hypotheses in exactly the order that enumerating them gives.
    rng = np.random.default_rng(0)
    prefixes = [p for n in range(3) for p in itertools.product((A, B), repeat=n)]
    for alpha in (0.0, 0.6, 1.0, 2.0):
        table: Table = {}
        for prefix in prefixes:
            p = rng.dirichlet(np.ones(3))
            table[prefix] = {A: p[0], B: p[1], EOS: p[2]}
        for prefix in itertools.product((A, B), repeat=3):
            table[prefix] = {EOS: 0.4, A: 0.6}
        expected = []
        for prefix in [*prefixes, *itertools.product((A, B), repeat=3)]:
            log_prob = sum(math.log(table[prefix[:i]][t]) for i, t in enumerate(prefix))
            log_prob += math.log(table[prefix][EOS])
            expected.append((list(prefix), log_prob / lp(len(prefix) + 1, alpha)))
        expected.sort(key=lambda e: -e[1])
        config = DecodingOptions(beam_size=16, n_best=15, length_penalty=alpha, max_length=3)
        (hyps,), _ = run([table], config)
        assert [h.tokens for h in hyps] == [tokens for tokens, _ in expected]
        assert [h.score for h in hyps] == pytest.approx([score for _, score in expected], rel=1e-5)
        (best,), _ = run([table], DecodingOptions(beam_size=16, length_penalty=alpha, max_length=3))
        assert best[0].tokens == expected[0][0]


def random_step(n_sentences: int, vocab: int):
    """A step function with a fixed random distribution per (sentence, prefix); EOS grows likelier with length."""
    rows: list[tuple[int, Prefix]] = []

    def dist(sentence: int, prefix: Prefix) -> np.ndarray:
        rng = np.random.default_rng([sentence, *prefix])
        logits = 2.0 * rng.standard_normal(vocab)
        logits[[PAD, BOS]] = -np.inf
        logits[EOS] += 1.5 * len(prefix)
        return (logits - np.logaddexp.reduce(logits)).astype(np.float32)

    def step_fn(tokens, step, reorder):
        nonlocal rows
        if reorder is None:
            rows = [(s, ()) for s in range(n_sentences)]
        else:
            rows = [(rows[r][0], rows[r][1] + (int(t),)) for r, t in zip(reorder, tokens, strict=True)]
        return np.stack([dist(s, prefix) for s, prefix in rows]), None

    return step_fn, dist


def reference_search(dist, max_len: int, config: DecodingOptions) -> list[tuple[list[int], float]]:
    """The same search written plainly, one sentence at a time, with Python sorts over every candidate."""
    k, alpha = config.beam_size, config.length_penalty
    beams: list[tuple[float, Prefix]] = [(0.0, ())]
    finished: list[tuple[float, Prefix]] = []
    for step in range(max_len + 1):
        if step == max_len:
            for log_prob, prefix in beams:
                finished.append(((log_prob + float(dist(prefix)[EOS])) / lp(step + 1, alpha), prefix))
            finished.sort(key=lambda f: -f[0])
            break
        candidates = [
            (log_prob + float(value), row, token)
            for row, (log_prob, prefix) in enumerate(beams)
            for token, value in enumerate(dist(prefix))
            if value > -np.inf
        ]
        candidates.sort(key=lambda c: (-c[0], c[1], c[2]))
        for rank, (log_prob, row, token) in enumerate(candidates[: 2 * k]):
            if token == EOS and rank < k:
                finished.append((log_prob / lp(step + 1, alpha), beams[row][1]))
        finished.sort(key=lambda f: -f[0])
        beams = [(v, beams[row][1] + (token,)) for v, row, token in candidates[: 2 * k] if token != EOS][:k]
        if k == 1 and finished:
            break
        if config.patience is not None:  # CTranslate2's rule: enough hypotheses finished
            if len(finished) >= max(config.n_best, math.floor(k * config.patience + 0.5)):
                break
        elif len(finished) >= config.n_best:
            bound = max(beams[0][0] / lp(step + 2, alpha), beams[0][0] / lp(max_len + 1, alpha))
            if bound <= finished[config.n_best - 1][0]:
                break
    return [(list(prefix), score) for score, prefix in finished[: config.n_best]]


@pytest.mark.parametrize(
    ("beam_size", "n_best", "alpha", "patience"),
    [
        (1, 1, 0.6, None),
        (3, 2, 0.6, None),
        (5, 5, 1.0, None),
        (4, 1, 0.0, None),
        (4, 1, 0.6, 1.0),
        (5, 2, 1.0, 0.5),
        (3, 1, 0.6, 2.0),
    ],
)
def test_matches_a_plain_reference_search_on_a_large_random_vocabulary(beam_size, n_best, alpha, patience):
    src_lengths = [3, 1, 6]
    config = DecodingOptions(
        beam_size=beam_size, n_best=n_best, length_penalty=alpha, max_length_offset=4, patience=patience
    )
    step_fn, dist = random_step(len(src_lengths), vocab=500)
    hyps = beam_search(step_fn, src_lengths, bos_id=BOS, eos_id=EOS, config=config)
    for sentence, src_length in enumerate(src_lengths):
        expected = reference_search(lambda p, s=sentence: dist(s, p), src_length + 4, config)
        assert [h.tokens for h in hyps[sentence]] == [tokens for tokens, _ in expected]
        assert [h.score for h in hyps[sentence]] == pytest.approx([score for _, score in expected], rel=1e-6)


@pytest.mark.parametrize(
    ("changes", "field_name"),
    [
        ({"beam_size": 0}, "beam_size"),
        ({"beam_size": 2.5}, "beam_size"),
        ({"n_best": 0}, "n_best"),
        ({"beam_size": 2, "n_best": 3}, "n_best"),
        ({"length_penalty": math.nan}, "length_penalty"),
        ({"length_penalty": "0.6"}, "length_penalty"),
        ({"max_length_offset": -1}, "max_length_offset"),
        ({"max_length": 0}, "max_length"),
        ({"min_length": -1}, "min_length"),
        ({"min_length": 5, "max_length": 4}, "min_length"),
        ({"return_attention": 1}, "return_attention"),
        ({"patience": 0.0}, "patience"),
        ({"patience": math.inf}, "patience"),
        ({"patience": "1"}, "patience"),
    ],
)
def test_invalid_config_names_the_field(changes, field_name):
    with pytest.raises(ValueError, match=field_name):
        DecodingOptions(**changes)


def test_invalid_inputs_and_step_outputs_raise():
    with pytest.raises(ValueError, match="src_lengths"):
        beam_search(ScriptedStep([{}]), [-1], bos_id=BOS, eos_id=EOS)
    assert beam_search(ScriptedStep([]), [], bos_id=BOS, eos_id=EOS) == []

    def wrong_shape(tokens, step, reorder):
        return np.zeros((len(tokens) + 1, V), np.float32), None

    with pytest.raises(ValueError, match="log_probs of shape"):
        beam_search(wrong_shape, [3], bos_id=BOS, eos_id=EOS)

    def nan(tokens, step, reorder):
        log_probs = np.full((len(tokens), V), -2.0, np.float32)
        log_probs[:, B] = np.nan
        return log_probs, None

    for beam_size in (1, 4):  # the partition path (2K < V) and the take-everything path
        with pytest.raises(ValueError, match="NaN"):
            beam_search(nan, [3], bos_id=BOS, eos_id=EOS, config=DecodingOptions(beam_size=beam_size))


class _Prefers:
    """A step function whose favourite token is always ``token`` (then word 4, then EOS)."""

    def __init__(self, token: int) -> None:
        self.token = token

    def __call__(self, tokens: np.ndarray, step: int, reorder: np.ndarray | None) -> tuple[np.ndarray, None]:
        probs = np.full((tokens.size, 6), 0.01)
        probs[:, self.token] = 0.6
        probs[:, 4] = 0.3
        probs[:, 3] = 0.07
        return np.log(probs / probs.sum(axis=1, keepdims=True)).astype(np.float32), None


@pytest.mark.parametrize("favourite", [0, 2])  # PAD, BOS
def test_pad_and_bos_are_never_generated(favourite: int) -> None:
    cfg = DecodingOptions(beam_size=1, max_length=3)
    [[hyp]] = beam_search(_Prefers(favourite), [1], bos_id=2, eos_id=3, pad_id=0, config=cfg)
    assert hyp.tokens == [4, 4, 4]


def test_max_positions_caps_the_output_length() -> None:
    # Source length 10 + offset 50 would allow 60 tokens; a 9-position table leaves room for 8 and the EOS.
    [[hyp]] = beam_search(_Prefers(4), [10], bos_id=2, eos_id=3, config=DecodingOptions(beam_size=1), max_positions=9)
    assert hyp.tokens == [4] * 8


def test_the_search_asks_each_row_for_2k_candidates_plus_the_banned_tokens() -> None:
    asked: list[int] = []
    inner = FullTableStep(_Prefers(4), eos_id=3)

    def recording(tokens, step, reorder, k) -> StepOutput:
        asked.append(k)
        return inner(tokens, step, reorder, k)

    config = DecodingOptions(beam_size=3, min_length=1, max_length=3)
    candidate_beam_search(recording, [2], bos_id=2, eos_id=3, pad_id=0, config=config)
    assert asked[0] == 2 * 3 + 3  # BOS, PAD and (before min_length) EOS are dropped from each row's list
    assert set(asked[1:]) == {2 * 3 + 2}


def test_top_k_rows_is_best_first_with_ties_in_id_order() -> None:
    log_probs = np.array([[-1.0, -0.5, -0.5, -3.0, -0.1], [-2.0, -2.0, -2.0, -2.0, -2.0]], dtype=np.float32)
    scores, ids = top_k_rows(log_probs, 3)
    assert ids.tolist() == [[4, 1, 2], [0, 1, 2]]
    assert scores.tolist() == [[np.float32(-0.1), -0.5, -0.5], [-2.0, -2.0, -2.0]]
    assert top_k_rows(log_probs, 9)[1].shape == (2, 5)  # k above V: the whole row


def test_sentence_blocks_are_equal_runs_of_one_sentence_each():
    blocks = sentence_blocks
    assert blocks(np.array([0, 0, 0, 0, 1, 1, 1, 1])).tolist() == [0, 1]  # beam 4: one cross K/V per sentence
    assert blocks(np.array([2, 2, 0, 0, 5, 5])).tolist() == [2, 0, 5]  # any sentence order
    assert blocks(np.array([0, 1, 2])).tolist() == [0, 1, 2]  # first step: one row each
    assert blocks(np.array([0, 0, 1, 1, 1, 1])) is None  # unequal blocks (continuous batching): per row
    assert blocks(np.array([0, 1, 0, 1])).tolist() == [0, 1, 0, 1]  # rows apart: blocks of one, one entry per row
    assert blocks(np.array([0, 0, 1, 1, 0, 0])).tolist() == [0, 1, 0]  # a sentence twice: its entry twice
    assert blocks(np.array([3, 3, 3])).tolist() == [3]
    assert blocks(np.array([], dtype=np.int64)).tolist() == []
