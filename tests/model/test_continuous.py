"""Continuous batching over the exported copy model: 300 sentences joining at random steps == each decoded alone.

The reference is the static beam search (``model.search.beam_search`` over ``OrtStepFunction``) on one
sentence at a time; the continuous batch mixes beam sizes, n-best, length penalties and max lengths, with
rows at different positions sharing every call through the padded, masked self-attention cache.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
from helpers import COPY_TASK, toy_pairs

from model.continuous import ContinuousBatch, OrtRowStep, length_groups
from model.decode import search_batch
from model.decoding import DecodingOptions
from model.runtime import OrtModel
from model.search import Hypothesis
from model.signature import CAPACITY_STEP
from model.tokenizer import Tokenizer, pad_sources


@pytest.fixture(scope="module")
def ort_model(served_model_dir: Path) -> OrtModel:
    return OrtModel.load(served_model_dir, "fp32")


@pytest.fixture(scope="module")
def sources(served_model_dir: Path, copy_task_dir: Path) -> list[list[int]]:
    """300 copy-task sentences: the 150 held-out ones (test and valid splits) and 150 more drawn like them."""
    tokenizer = Tokenizer(served_model_dir / "spm.model")
    lines = [
        *(copy_task_dir / "test.src").read_text().splitlines(),
        *(copy_task_dir / "valid.src").read_text().splitlines(),
        *(src for src, _ in toy_pairs(150, "copy", seed=23, **COPY_TASK)),
    ]
    return tokenizer.encode_batch(lines)


def recording(model: OrtModel, fed: list[dict]) -> OrtModel:
    """A copy of ``model`` whose decoder calls append their feeds (past and cross K/V included) to ``fed``."""
    copied = copy.copy(model)

    def run_step(feeds, past, cross):
        kv = zip(model.past_names + model.cross_names, [*past, *cross], strict=True)
        fed.append({**feeds, **dict(kv)})
        return model.run_step(feeds, past, cross)

    copied.run_step = run_step
    return copied


def step_position(batch: ContinuousBatch) -> int:
    """The next call's largest position (0 when nothing is live)."""
    return int(batch.search.positions().max(initial=0))


def decode_alone(model: OrtModel, src: list[int], options: DecodingOptions) -> list[Hypothesis]:
    src_ids, src_mask = pad_sources([src], max_len=model.config.max_positions)
    (hyps,) = search_batch(model.step_function(src_ids, src_mask), [len(src)], model.config, options)
    return hyps


def assert_decoded_as_if_alone(
    model: OrtModel, chosen: list[list[int]], options: DecodingOptions, results: dict[object, list[Hypothesis]]
) -> None:
    """Each sentence's hypotheses (``results[i]`` for ``chosen[i]``) equal the sentence decoded alone."""
    for i, src in enumerate(chosen):
        alone = decode_alone(model, src, options)
        assert [h.tokens for h in results[i]] == [h.tokens for h in alone]
        np.testing.assert_allclose([h.score for h in results[i]], [h.score for h in alone], rtol=1e-5, atol=1e-5)


def random_options(rng: np.random.Generator) -> DecodingOptions:
    beam = int(rng.integers(1, 6))
    max_length = [None, None, None, 3][rng.integers(4)]  # some sentences end at their max length
    return DecodingOptions(
        beam_size=beam,
        n_best=int(rng.integers(1, beam + 1)),
        length_penalty=float(rng.choice([0.0, 0.6, 1.0])),
        max_length=max_length,
        min_length=int(rng.choice([0, 0, 2])),
        return_attention=bool(rng.integers(2)),
        patience=[None, None, 1.0, 0.5][rng.integers(4)],  # CTranslate2's stopping rule for some
    )


def test_sentences_joining_at_random_steps_decode_as_if_alone(ort_model: OrtModel, sources: list[list[int]]) -> None:
    rng = np.random.default_rng(0)
    options = [random_options(rng) for _ in sources]
    batch = ContinuousBatch(OrtRowStep(ort_model), ort_model.config)
    results: dict[int, list[Hypothesis]] = {}
    waiting = list(range(len(sources)))
    mixed_positions = contiguous = steps = 0
    while waiting or not batch.idle:
        steps += 1
        for _ in range(int(rng.integers(0, 5))):  # 0-4 sentences arrive before this step
            if waiting:
                i = waiting.pop(0)
                batch.admit(i, sources[i], options[i])
        positions = batch.search.positions()
        mixed_positions += len(np.unique(positions)) > 1
        for key, hyps in batch.step():
            results[key] = hyps
        assert batch.step_fn.n_rows == batch.live_rows  # retired rows are freed at once
        cache = batch.step_fn.past + batch.step_fn.cross
        contiguous += all(kv.flags.c_contiguous for kv in cache)  # cuts are gathered, not views onnxruntime copies
    assert contiguous == steps
    assert mixed_positions > 20  # rows at different positions really shared calls
    assert sorted(results) == list(range(len(sources)))
    copied = 0
    for i, src in enumerate(sources):
        alone = decode_alone(ort_model, src, options[i])
        got = results[i]
        assert [h.tokens for h in got] == [h.tokens for h in alone], (i, options[i])
        np.testing.assert_allclose([h.score for h in got], [h.score for h in alone], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose([h.log_prob for h in got], [h.log_prob for h in alone], rtol=1e-5, atol=1e-5)
        for g, a in zip(got, alone, strict=True):
            assert (g.attention is None) == (a.attention is None) == (not options[i].return_attention)
            if a.attention is not None:
                np.testing.assert_allclose(g.attention, a.attention, atol=1e-5)
        copied += got[0].tokens == src
    assert copied >= 0.5 * len(sources)  # real translations (max_length 3 cuts some), not degenerate ones


def test_a_retired_sentence_frees_its_rows_and_cache(ort_model: OrtModel, sources: list[list[int]]) -> None:
    short = min(sources, key=len)
    long = max(sources, key=len)
    step = OrtRowStep(ort_model)
    batch = ContinuousBatch(step, ort_model.config)
    batch.admit("long", long, DecodingOptions(beam_size=2))
    batch.step()
    batch.step()
    batch.admit("short", short, DecodingOptions(beam_size=4, max_length=2))
    rows = []
    retired: list[object] = []
    while not retired:
        retired = [key for key, _ in batch.step()]
        rows.append(batch.live_rows)
    assert retired == ["short"]
    assert rows[-2:] == [2 + 4, 2]  # the short sentence's 4 beams are gone right after it finished
    assert step.n_rows == 2  # the short sentence's rows are freed at once
    position = 2 + len(rows)  # the long one's: its cache holds that many slots, the next call writes one more
    assert position < step.capacity <= position + CAPACITY_STEP  # room for the next steps, not much more
    fed: list[dict] = []
    step.model = recording(ort_model, fed)
    retired += [key for key, _ in batch.step()]
    past = [fed[0][name] for name in ort_model.past_names]  # what the next call reads: the long one's rows only
    assert all(kv.shape[:2] == (2, ort_model.config.n_heads) for kv in past)
    assert all(kv.flags.c_contiguous for kv in past + step.cross)  # kept by a gather, not left as a view
    while not batch.idle:
        retired += [key for key, _ in batch.step()]
        if not batch.idle:  # grows with the oldest row, no further
            assert step.capacity <= step_position(batch) + 2 * CAPACITY_STEP
    assert retired == ["short", "long"]
    assert step.n_rows == 0 and step.src_mask.shape == (0, 0)


def test_cancelled_sentences_leave_at_once_and_the_others_decode_as_if_alone(
    ort_model: OrtModel, sources: list[list[int]]
) -> None:
    rng = np.random.default_rng(1)
    chosen = sources[:40]
    options = [random_options(rng) for _ in chosen]
    batch = ContinuousBatch(OrtRowStep(ort_model), ort_model.config)
    results: dict[int, list[Hypothesis]] = {}
    cancelled: set[int] = set()
    waiting = list(range(len(chosen)))
    while waiting or not batch.idle:
        for _ in range(int(rng.integers(0, 4))):
            if waiting:
                i = waiting.pop(0)
                batch.admit(i, chosen[i], options[i])
        for key, hyps in batch.step():
            results[key] = hyps
        live = [s.key for s in batch.search.live]
        if live and rng.random() < 0.5:  # a client leaves: its live sentence and maybe a queued one go
            gone = {live[int(rng.integers(len(live)))]}
            if batch.pending and rng.random() < 0.5:
                gone.add(batch.pending[0][0])
            cancelled |= gone
            rows_before = batch.live_rows
            batch.drop(gone)
            assert batch.live_rows < rows_before
            assert batch.step_fn.n_rows == batch.live_rows  # their rows are freed before the next call
            assert not gone & {s.key for s in batch.search.live} and not gone & {p[0] for p in batch.pending}
    assert len(cancelled) >= 5
    assert not cancelled & set(results)  # a cancelled sentence never comes back
    assert set(results) | cancelled == set(range(len(chosen)))
    for i, got in results.items():
        alone = decode_alone(ort_model, chosen[i], options[i])
        assert [h.tokens for h in got] == [h.tokens for h in alone], (i, options[i])
        np.testing.assert_allclose([h.score for h in got], [h.score for h in alone], rtol=1e-5, atol=1e-5)
        for g, a in zip(got, alone, strict=True):
            if a.attention is not None:
                np.testing.assert_allclose(g.attention, a.attention, atol=1e-5)


def test_beams_share_their_sentences_cross_kv_when_the_rows_come_in_blocks(
    ort_model: OrtModel, sources: list[list[int]]
) -> None:
    """Every sentence at beam 4: after the first step the rows come in blocks of 4, so the calls feed one cross
    K/V entry per sentence (rows = 4 x entries). A newcomer's first row among them is padded to a block of 4
    (the call feeds 4 rows more per entry than it decodes, less than a quarter more); many newcomers at once
    (6 first rows among 24) make the call feed one entry per row instead."""
    feeds: list[dict] = []
    step = OrtRowStep(ort_model)
    step.model = recording(ort_model, feeds)
    batch = ContinuousBatch(step, ort_model.config)
    options = DecodingOptions(beam_size=4)
    chosen = sources[:13]
    results = {}
    for i in range(6):
        batch.admit(i, chosen[i], options)
    calls, live = 0, []
    while not batch.idle:
        if calls == 3:  # newcomers join a running batch
            for i in range(6, 12):
                batch.admit(i, chosen[i], options)
        if calls == 5:  # one newcomer
            batch.admit(12, chosen[12], options)
        live.append(batch.live_sentences)
        results.update(batch.step())
        calls += 1
    assert all(f["src_pad_mask"].shape[0] == f["cross_key_0"].shape[0] for f in feeds)
    fed = [(f["tokens"].shape[0], f["cross_key_0"].shape[0]) for f in feeds]  # (rows, cross entries) of each call
    shared = [(rows, entries) for rows, entries in fed if entries < rows]
    assert len(shared) >= len(fed) // 2 and all(rows == 4 * entries for rows, entries in shared)
    assert fed[0] == (6, 6)  # one BOS row per sentence: blocks of one
    assert fed[3][0] == fed[3][1] > 6 + 6  # six newcomers' first rows among beams: one entry per row
    assert fed[5] == (4 * (live[5] + 1), live[5] + 1)  # one newcomer's first row padded to a block of 4
    assert_decoded_as_if_alone(ort_model, chosen, options, results)


def test_beams_keep_their_cache_rows_and_a_retired_sentences_block_is_filled_by_the_last(
    ort_model: OrtModel, sources: list[list[int]]
) -> None:
    """The cache rows stay where they are while the search reorders its beams: a call copies only a second
    child of a parent into a row no beam continues (rows - distinct parents), and a retired sentence's block
    takes the last block's rows (at most one block of 4 per retired sentence), not the whole cache."""
    step = OrtRowStep(ort_model)
    batch = ContinuousBatch(step, ort_model.config)
    options = DecodingOptions(beam_size=4)
    chosen = sorted(sources, key=len)[::25][:10]  # mixed lengths: sentences retire at different steps
    for i, src in enumerate(chosen):
        batch.admit(i, src, options)
    keep = step.keep
    checked = {"reorders": 0, "retirements": 0, "gathered": 0}

    def checking_keep(reorder: np.ndarray) -> None:
        if not (reorder.size == step.n_rows and (reorder == np.arange(reorder.size)).all()):
            checked["gathered"] += reorder.size  # what a gather of the kept rows (the layout before) copied
        before, blocks_before = step.copied_rows, step.block.copy()
        parents = np.unique(step.slot[reorder]).size
        retired = step.sentences.size - np.unique(step.row_sentence[reorder]).size
        keep(reorder)
        copied = step.copied_rows - before
        if (blocks_before == 4).all():  # every block at the beam size (after the newcomers' first call)
            assert copied <= reorder.size - parents + 4 * retired
            if retired == 0:
                assert copied == reorder.size - parents
                checked["reorders"] += reorder.size > parents
            else:
                checked["retirements"] += 1
        assert (step.block == 4).all() or (blocks_before == 1).all()  # blocks of the beam size (1 on the first call)

    step.keep = checking_keep
    results = {}
    while not batch.idle:
        results.update(batch.step())
    assert checked["reorders"] >= 3 and checked["retirements"] >= 3
    assert step.copied_rows < checked["gathered"] / 2
    assert_decoded_as_if_alone(ort_model, chosen, options, results)


def test_a_copied_row_copies_the_slots_it_has_written_not_the_oldest_rows(
    ort_model: OrtModel, sources: list[list[int]]
) -> None:
    """Short sentences' beams copied beside a long sentence's row copy their own few slots, not the long one's."""
    step = OrtRowStep(ort_model)
    batch = ContinuousBatch(step, ort_model.config)
    long = DecodingOptions(beam_size=1, min_length=30)  # one row (never copied), live for 30 steps at least
    batch.admit("long", max(sources, key=len), long)
    for _ in range(12):
        batch.step()
    shorts = sorted(sources, key=len)[:6]
    for i, src in enumerate(shorts):
        batch.admit(i, src, DecodingOptions(beam_size=4, max_length=4))  # at most 5 slots written each
    rows, slots, done = step.copied_rows, step.copied_slots, set()
    while len(done) < len(shorts):
        done |= {key for key, _ in batch.step()}
    assert "long" not in done and step_position(batch) > 12 + 4
    copied_rows, copied_slots = step.copied_rows - rows, step.copied_slots - slots
    assert copied_rows >= 6 * 3  # every short sentence's second to fourth beams at least
    assert copied_slots <= 5 * copied_rows


@pytest.mark.parametrize(
    "src, dst",
    [
        ([0, 2, 5], [1, 3, 7]),  # no target is a source: row by row
        ([0, 1, 2, 3], [1, 2, 3, 6]),  # a chain: each target is the next copy's source
        ([4, 5, 6, 7], [6, 7, 0, 1]),  # blocks shifting over each other
    ],
)
def test_copied_cache_rows_read_as_before_any_copy(ort_model: OrtModel, src: list[int], dst: list[int]) -> None:
    """A copy of cache rows gives each target its source's written slots as they were before the copy, whether
    targets and sources overlap or not; the rest of the cache is untouched."""
    step = OrtRowStep(ort_model)
    rows, slots = 8, 12
    step._fit(rows, slots)
    step.block = np.array([rows])  # one block in use: every row
    rng = np.random.default_rng(0)
    step._store[...] = rng.standard_normal(step._store.shape).astype(step._store.dtype)
    step.written = np.array([3, 9, 1, 12, 5, 2, 7, 4])
    before, written = step._store.copy(), step.written.copy()
    step._copy_rows(np.array(src), np.array(dst))
    expected = before.copy()
    for s, d in zip(src, dst, strict=True):
        expected[:, d, :, : written[s]] = before[:, s, :, : written[s]]
    expected_written = written.copy()
    expected_written[dst] = written[src]
    for d in dst:  # a target's slots past its new length are not read again; only its written ones must match
        expected[:, d, :, expected_written[d] :] = step._store[:, d, :, expected_written[d] :]
    np.testing.assert_array_equal(step._store, expected)
    np.testing.assert_array_equal(step.written[:rows], expected_written)
    assert step.copied_rows == len(dst) and step.copied_slots >= int(written[src].sum())


def test_newcomers_are_encoded_in_runs_of_similar_length_at_the_least_padded_cost() -> None:
    rng = np.random.default_rng(3)
    for _ in range(200):
        lengths = rng.integers(1, 60, size=int(rng.integers(1, 9)))
        call = int(rng.choice([0, 8, 32, 1000]))
        groups = length_groups(lengths, call)
        assert sorted(np.concatenate(groups).tolist()) == list(range(len(lengths)))  # each sentence once
        cost = sum(call + len(g) * lengths[g].max() for g in groups)
        # Against every cut of the sorted lengths into runs (2^(n-1) of them).
        ordered = np.sort(lengths)
        best = min(
            sum(
                call + len(run) * run.max()
                for run in np.split(ordered, [i + 1 for i in range(len(ordered) - 1) if cuts >> i & 1])
            )
            for cuts in range(2 ** (len(ordered) - 1))
        )
        assert cost == best
    assert len(length_groups(np.array([5, 40, 6, 41]), 32)) == 2  # the short pair apart from the long pair
    assert len(length_groups(np.array([5, 40, 6, 41]), 1000)) == 1  # a call costs more than the padding
