"""Sentence splitting and rejoining, and how sentence results merge into one text's result."""

from __future__ import annotations

import numpy as np
import pytest

from service.engine import Attention, Candidate, SentenceResult, word_alignment
from service.segment import merge, split_text


@pytest.mark.parametrize(
    ("language", "text", "sentences"),
    [
        ("en", "Hello world.", ["Hello world."]),
        ("en", "One. Two! Three? Four", ["One.", "Two!", "Three?", "Four"]),
        ("en", 'He said "Stop." Then left.', ['He said "Stop."', "Then left."]),
        ("en", "a\nb\n\nc", ["a", "b", "c"]),
        ("en", "  padded  ", ["padded"]),
        ("en", "3.5 apples. 2 pears", ["3.5 apples.", "2 pears"]),
        ("en", "", []),
        ("en", " \n ", []),
        # Abbreviations the old regex split after ("A group of friends. A garbage man..." from one sentence).
        ("de", "Dr. Müller geht nach Hause.", ["Dr. Müller geht nach Hause."]),
        ("de", "Dr. Müller geht z.B. nach Hause. Er ist müde!", ["Dr. Müller geht z.B. nach Hause.", "Er ist müde!"]),
        ("de-DE", "Wir sehen uns am 3. Mai. Bis dann.", ["Wir sehen uns am 3. Mai.", "Bis dann."]),
        ("en", "Mr. Smith met Dr. Jones.  Then he left.", ["Mr. Smith met Dr. Jones.", "Then he left."]),
        ("src", "w01 w02. w03\r\n w04", ["w01 w02.", "w03", "w04"]),  # an unknown code: English rules
    ],
)
def test_split_text(language: str, text: str, sentences: list[str]) -> None:
    segmented = split_text(text, language=language)
    assert segmented.sentences == sentences
    assert segmented.join(segmented.sentences) == text  # whitespace and line breaks come back exactly


def test_split_can_be_turned_off() -> None:
    segmented = split_text(" One. Two.\nThree ", sentences=False)
    assert segmented.sentences == ["One. Two.\nThree"]
    assert segmented.join(["X"]) == " X "


def _result(texts: list[str], scores: list[float], attention: Attention | None = None) -> SentenceResult:
    return SentenceResult([Candidate(t, [], s) for t, s in zip(texts, scores, strict=True)], attention)


def test_merge_joins_best_and_alternatives() -> None:
    segmented = split_text("One. Two.")
    merged = merge(segmented, [_result(["a", "a2", "a3"], [-1, -2, -3]), _result(["b", "b2"], [-0.5, -1])], 3)
    assert merged.text == "a b"
    assert merged.score == pytest.approx(-1.5)
    assert merged.alternatives == [("a2 b2", pytest.approx(-3.0)), ("a3 b2", pytest.approx(-4.0))]


def test_merged_attention_is_block_diagonal_and_rows_sum_to_one() -> None:
    first = Attention(["▁a", "b", "▁c"], ["▁x", "▁y"], np.array([[0.9, 0.1, 0.0], [0.0, 0.2, 0.8]]), [(0, 0), (1, 1)])
    second = Attention(["▁d"], ["▁z"], np.array([[1.0]]), [(0, 0)])
    merged = merge(split_text("S1.\nS2."), [_result(["x y"], [0], first), _result(["z"], [0], second)], 1)
    attention = merged.attention
    assert attention.source_tokens == ["▁a", "b", "▁c", "▁d"]
    assert attention.weights.shape == (3, 4)
    np.testing.assert_allclose(attention.weights.sum(axis=1), 1.0)
    assert attention.weights[2, 3] == 1.0 and attention.weights[:2, 3].sum() == 0
    assert attention.alignment == [(0, 0), (1, 1), (2, 2)]


def test_word_alignment_sums_subwords() -> None:
    # Target word 0 = "▁x" "x"; its two rows together favour source word 1 ("▁c").
    weights = np.array([[0.4, 0.0, 0.6], [0.3, 0.0, 0.7], [1.0, 0.0, 0.0]])
    assert word_alignment(["▁a", "b", "▁c"], ["▁x", "x", "▁y"], weights) == [(1, 0), (0, 1)]
