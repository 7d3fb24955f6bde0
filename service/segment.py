"""Texts to sentences and back: split at line breaks and sentence ends, translate, rejoin with the original spacing.

A text becomes its sentences plus the whitespace around them (``separators``, one more than the sentences),
so that line breaks, blank lines and leading/trailing space come back exactly where they were. A sentence
ends at a line break, or at ``.``, ``!``, ``?`` or ``…`` (closing quotes and brackets may follow) before
whitespace and a character that is not lower case; abbreviations such as "Dr. Smith" are split too.

Translations of a text's sentences are joined back into one result: the best texts joined, scores summed,
the k-th alternative made of each sentence's k-th candidate (its last one where it has fewer), and attention
laid out block-diagonally (each sentence's target rows attend over its own source tokens only). That matrix
is dense, so it grows with the square of the text's length: ``attention_cells`` says how big it would be, and
the service refuses (413) responses over ``MT_MAX_ATTENTION_CELLS`` before building it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from service.engine import Attention, SentenceResult, word_index

SENTENCE_END = ".!?…"
CLOSERS = "\"'”’»)]"
_WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class Segmented:
    sentences: list[str]
    separators: list[str]  # len(sentences) + 1: before the first, between each pair, after the last

    def join(self, translations: list[str]) -> str:
        parts = [self.separators[0]]
        for text, sep in zip(translations, self.separators[1:], strict=True):
            parts += [text, sep]
        return "".join(parts)


@dataclass(frozen=True)
class TextResult:
    text: str
    score: float
    alternatives: list[tuple[str, float]]  # best first, the best itself excluded
    attention: Attention | None


def _ends_sentence(text: str, start: int, end: int) -> bool:
    """Whether the whitespace run ``text[start:end]`` is a sentence boundary."""
    if "\n" in text[start:end]:
        return True
    i = start - 1
    while i >= 0 and text[i] in CLOSERS:
        i -= 1
    return i >= 0 and text[i] in SENTENCE_END and end < len(text) and not text[end].islower()


def split_text(text: str, sentences: bool = True) -> Segmented:
    """Split ``text`` into sentences (or, with ``sentences`` False, keep it whole, trimmed)."""
    stripped = text.strip()
    if not stripped:
        return Segmented([], [text])
    lead, trail = text[: len(text) - len(text.lstrip())], text[len(text.rstrip()) :]
    if not sentences:
        return Segmented([stripped], [lead, trail])
    found, separators, begin = [], [lead], len(lead)
    for match in _WHITESPACE.finditer(text, len(lead), len(text) - len(trail)):
        if _ends_sentence(text, match.start(), match.end()):
            found.append(text[begin : match.start()])
            separators.append(match.group())
            begin = match.end()
    found.append(text[begin : len(text) - len(trail)])
    separators.append(trail)
    return Segmented(found, separators)


def merge(segmented: Segmented, results: list[SentenceResult], n_best: int) -> TextResult:
    """One text's result from its sentences' results (in order)."""
    ranked = [r.candidates for r in results]
    best = [c[0].text if c else "" for c in ranked]
    score = float(sum(c[0].score for c in ranked if c))
    alternatives = []
    depth = min(n_best, max((len(c) for c in ranked), default=0))
    for k in range(1, depth):
        chosen = [c[min(k, len(c) - 1)] if c else None for c in ranked]
        text = segmented.join([c.text if c else "" for c in chosen])
        alternatives.append((text, float(sum(c.score for c in chosen if c))))
    attentions = [r.attention for r in results]
    attention = None if any(a is None for a in attentions) else merge_attention(attentions)  # type: ignore[arg-type]
    return TextResult(segmented.join(best), score, alternatives, attention)


def attention_cells(results: list[SentenceResult]) -> int:
    """Weights in the merged attention of one text's sentences: all target tokens x all source tokens (the
    block-diagonal matrix is dense, so this grows with the square of the text's length)."""
    parts = [r.attention for r in results if r.attention is not None]
    return sum(len(p.target_tokens) for p in parts) * sum(len(p.source_tokens) for p in parts)


def merge_attention(parts: list[Attention]) -> Attention:
    """Sentences' attention as one block-diagonal matrix; word indices offset by the words before."""
    source_tokens: list[str] = []
    target_tokens: list[str] = []
    alignment: list[tuple[int, int]] = []
    n_src = sum(len(p.source_tokens) for p in parts)
    rows = []
    src_words = tgt_words = 0
    for part in parts:
        block = np.zeros((len(part.target_tokens), n_src))
        block[:, len(source_tokens) : len(source_tokens) + len(part.source_tokens)] = part.weights
        rows.append(block)
        alignment += [(s + src_words, t + tgt_words) for s, t in part.alignment]
        src_words += _count_words(part.source_tokens)
        tgt_words += _count_words(part.target_tokens)
        source_tokens += part.source_tokens
        target_tokens += part.target_tokens
    weights = np.concatenate(rows) if rows else np.zeros((0, n_src))
    return Attention(source_tokens, target_tokens, weights, alignment)


def _count_words(pieces: list[str]) -> int:
    return int(word_index(pieces)[-1]) + 1 if pieces else 0
