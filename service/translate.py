"""One translate request end to end, below HTTP: limits, sentence splitting, tokenizing, batching, rejoining."""

from __future__ import annotations

import asyncio

import numpy as np

from service.engine import Attention, Candidate, DecodeOptions, SentenceResult
from service.registry import ServedModel
from service.schemas import Alternative, AttentionOut, TranslateRequest, TranslateResponse, Translation
from service.segment import Segmented, TextResult, merge, split_text
from service.settings import Settings

INLINE_CHARS = 2000  # requests up to this many characters are tokenized on the event loop (tens of µs)


class TooLarge(ValueError):
    """The request exceeds MT_MAX_ITEMS or MT_MAX_CHARS (413)."""


class BadOption(ValueError):
    """A decoding option outside what this server or model allows (422)."""


def check_limits(body: TranslateRequest, settings: Settings, served: ServedModel) -> None:
    texts = body.texts
    if len(texts) > settings.max_items:
        raise TooLarge(f"{len(texts)} texts in one request; send at most {settings.max_items} (MT_MAX_ITEMS)")
    long = [i for i, text in enumerate(texts) if len(text) > settings.max_chars]
    if long:
        where = "text" if isinstance(body.text, str) else f"text[{long[0]}]"
        raise TooLarge(
            f"{where} has {len(texts[long[0]])} characters; send at most {settings.max_chars} per text "
            "(MT_MAX_CHARS), split it across several texts"
        )
    if body.beam_size > settings.max_beam:
        raise BadOption(f"beam_size {body.beam_size} is above this server's limit: use at most {settings.max_beam}")
    longest = served.engine.max_positions - 1
    if body.max_length is not None and body.max_length > longest:
        raise BadOption(
            f"max_length {body.max_length} is above what model {served.engine.name} allows: at most {longest}"
        )


def _prepare(texts: list[str], served: ServedModel, split: bool) -> tuple[list[Segmented], list[list[int]]]:
    segmented = [split_text(text, split) for text in texts]
    sentences = [s for seg in segmented for s in seg.sentences]
    return segmented, served.engine.encode(sentences)


async def translate(
    body: TranslateRequest, served: ServedModel, settings: Settings, request_id: str
) -> TranslateResponse:
    """Split, tokenize (off the event loop unless small), queue every sentence in one go, rejoin per text."""
    options = DecodeOptions(
        beam_size=body.beam_size,
        n_best=body.n_best,
        length_penalty=body.length_penalty,
        max_length=body.max_length,
        return_attention=body.return_attention,
    )
    texts = body.texts
    if sum(len(text) for text in texts) <= INLINE_CHARS:  # a thread hop costs more than tokenizing this much
        segmented, sources = _prepare(texts, served, settings.split_sentences)
    else:
        segmented, sources = await asyncio.to_thread(_prepare, texts, served, settings.split_sentences)
    # Tokenless sentences (nothing SentencePiece keeps) translate to "" without the engine.
    queued = [i for i, src in enumerate(sources) if src]
    decoded = await served.batcher.translate([sources[i] for i in queued], options, request_id)
    results = [_empty(options)] * len(sources)
    for i, result in zip(queued, decoded, strict=True):
        results[i] = result
    translations, start = [], 0
    for seg in segmented:
        merged = merge(seg, results[start : start + len(seg.sentences)], body.n_best)
        translations.append(_translation(merged, body))
        start += len(seg.sentences)
    return TranslateResponse(model=served.engine.name, translations=translations)


def _empty(options: DecodeOptions) -> SentenceResult:
    attention = Attention([], [], np.zeros((0, 0)), []) if options.return_attention else None
    return SentenceResult([Candidate("", [], 0.0)], attention)


def _translation(merged: TextResult, body: TranslateRequest) -> Translation:
    out = Translation(text=merged.text)
    if body.return_scores:
        out.score = merged.score
    if body.n_best > 1:
        out.alternatives = [Alternative(text=text, score=score) for text, score in merged.alternatives]
    if merged.attention is not None:
        a = merged.attention
        out.attention = AttentionOut(
            source_tokens=a.source_tokens,
            target_tokens=a.target_tokens,
            weights=a.weights.tolist(),
            alignment=[list(pair) for pair in a.alignment],
        )
    return out
