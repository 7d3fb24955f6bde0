"""Texts to sentences and back: split at line breaks and sentence ends, translate, rejoin with the original spacing.

A text becomes its sentences plus the whitespace around them (``separators``, one more than the sentences),
so that line breaks, blank lines and leading/trailing space come back exactly where they were. A line break
always ends a sentence; within a line, sentence ends are found by sentencex (Wikimedia's rule-based segmenter,
with abbreviation lists for about 300 languages, falling back along a language chain, to English at last),
given the source language of the model: "Dr. Müller geht nach Hause." stays one sentence.

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
import sentencex

from service.engine import Attention, SentenceResult, word_index
from service.registry import normalize

_LINES = re.compile(r"\s*\n\s*")  # a line break, with the whitespace around it


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


def _sentences(line: str, language: str) -> list[tuple[str, str]]:
    """A line (no line break, no leading whitespace) as (sentence, whitespace after it) pairs."""
    pieces = list(sentencex.segment(language, line))
    if "".join(pieces) != line:  # sentencex keeps every character; if it ever did not, keep the line whole
        pieces = [line]
    out = []
    for piece in pieces:
        sentence = piece.strip()
        before = piece[: len(piece) - len(piece.lstrip())]
        if out and (before or not sentence):  # whitespace belongs to the separator after the sentence before
            out[-1] = (out[-1][0], out[-1][1] + (before if sentence else piece))
        if sentence:
            out.append((sentence, piece[len(before) + len(sentence) :]))
    return out


def split_text(text: str, sentences: bool = True, language: str = "en") -> Segmented:
    """Split ``text`` into sentences by the rules of ``language`` (a BCP-47 tag), or with ``sentences`` False
    keep it whole (trimmed)."""
    stripped = text.strip()
    if not stripped:
        return Segmented([], [text])
    lead, trail = text[: len(text) - len(text.lstrip())], text[len(text.rstrip()) :]
    if not sentences:
        return Segmented([stripped], [lead, trail])
    code = normalize(language).split("-", 1)[0]
    found, separators = [], [lead]
    breaks = list(_LINES.finditer(stripped))
    starts = [0] + [m.end() for m in breaks]
    ends = [m.start() for m in breaks] + [len(stripped)]
    for i, (begin, end) in enumerate(zip(starts, ends, strict=True)):
        for sentence, after in _sentences(stripped[begin:end], code):
            found.append(sentence)
            separators.append(after)
        separators[-1] += breaks[i].group() if i < len(breaks) else ""
    separators[-1] += trail
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
