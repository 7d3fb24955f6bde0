"""One translate request end to end, below HTTP: limits, sentence splitting, tokenizing, batching, rejoining."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import numpy as np

from model.decoding import DecodingOptions
from model.model_dir import ModelInfo
from service.engine import Attention, Candidate, SentenceResult, SentenceTooLong
from service.registry import ServedModel
from service.schemas import Alternative, AttentionOut, TranslateRequest, TranslateResponse, Translation
from service.segment import Segmented, TextResult, attention_cells, merge, split_text
from service.settings import Settings

INLINE_CHARS = 2000  # requests up to this many characters are tokenized on the event loop (tens of µs)


class TooLarge(ValueError):
    """The request exceeds MT_MAX_ITEMS, MT_MAX_CHARS or MT_MAX_ATTENTION_CELLS (413)."""


class BadOption(ValueError):
    """A decoding option outside what this server or model allows (422)."""


def check_limits(body: TranslateRequest, settings: Settings, info: ModelInfo) -> None:
    """413/422 for what this server or model refuses; from model.json alone, so a model not loaded yet is not
    loaded for a request it would refuse."""
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
    beam = decoding_options(body, info).beam_size
    if beam > settings.max_beam:
        given = "beam_size" if body.beam_size is not None else "the model's default beam (raised to n_best)"
        raise BadOption(f"{given} {beam} is above this server's limit: use at most {settings.max_beam}")
    longest = info.config.max_positions - 1
    if body.max_length is not None and body.max_length > longest:
        raise BadOption(f"max_length {body.max_length} is above what model {info.name} allows: at most {longest}")


def _prepare(
    texts: list[str], served: ServedModel, split: bool, listed: bool = True
) -> tuple[list[Segmented], list[list[int]]]:
    """Split and tokenize; a request with more sentences than the queue holds is refused as soon as splitting
    shows it (TooManySentences), before the rest is split or anything is tokenized."""
    segmented, count = [], 0
    for i, text in enumerate(texts):
        seg = split_text(text, split, served.pair[0])  # the source language's sentence rules
        count += len(seg.sentences)
        served.batcher.check_size(count, at_least=i < len(texts) - 1)
        segmented.append(seg)
    sentences = [s for seg in segmented for s in seg.sentences]
    try:
        return segmented, served.engine.encode(sentences)
    except SentenceTooLong as error:
        raise TooLarge(_too_long(error, segmented, listed, split)) from None


def _too_long(error: SentenceTooLong, segmented: list[Segmented], listed: bool, split: bool) -> str:
    """The 413 message for a sentence over the model's positions: which text, how long, and what to change."""
    text, first = 0, 0
    while first + len(segmented[text].sentences) <= error.index:
        first += len(segmented[text].sentences)
        text += 1
    where = f"text[{text}]" if listed else "text"
    if split:
        where += f" (sentence {error.index - first + 1})"
        change = "split the sentence into shorter ones (at ., !, ? or a line break)"
    else:
        change = "split the text into shorter ones, or set MT_SPLIT_SENTENCES=true to translate it sentence by sentence"
    return (
        f"{where} has {error.length} subword tokens in one sentence, over the {error.limit} that model "
        f"{error.model} reads: {change}"
    )


def check_attention(segmented: list[Segmented], results: list[SentenceResult], limit: int) -> None:
    """TooLarge when the attention matrices of the response (one block-diagonal matrix per text, target
    tokens x source tokens) would hold more than ``limit`` weights in all."""
    total, start = 0, 0
    for seg in segmented:
        total += attention_cells(results[start : start + len(seg.sentences)])
        start += len(seg.sentences)
    if total > limit:
        raise attention_too_large(total, limit)


def attention_too_large(cells: int, limit: int, at_least: bool = False) -> TooLarge:
    return TooLarge(
        f"return_attention would return {'at least ' if at_least else ''}{cells} attention weights (target x "
        f"source tokens of each text), over this server's limit of {limit} (MT_MAX_ATTENTION_CELLS): send fewer "
        "or shorter texts with return_attention, or leave it off"
    )


class AttentionBudget:
    """Refuses a return_attention request (TooLarge) as soon as its finished sentences prove the response
    over the budget, not after the whole decode: a text's matrix is (its target tokens) x (its source tokens),
    the source side is known before decoding, and each finished sentence adds its target tokens for good."""

    def __init__(self, segmented: list[Segmented], sources: list[list[int]], queued: list[int], limit: int) -> None:
        self.limit = limit
        text_of = [t for t, seg in enumerate(segmented) for _ in seg.sentences]  # sentence -> its text
        self.text_of = [text_of[i] for i in queued]  # queued position -> its text
        self.source_tokens = [0] * len(segmented)
        for i, src in enumerate(sources):
            self.source_tokens[text_of[i]] += len(src)
        self.cells = 0  # a lower bound of the response's weights: finished target tokens x source tokens

    def __call__(self, index: int, result: SentenceResult) -> None:
        if result.attention is None:
            return
        self.cells += len(result.attention.target_tokens) * self.source_tokens[self.text_of[index]]
        if self.cells > self.limit:
            raise attention_too_large(self.cells, self.limit, at_least=True)


def decoding_options(body: TranslateRequest, info: ModelInfo) -> DecodingOptions:
    """The request's decoding: what it sets, the model's defaults (model.json ``decoding``) for the rest; a
    default beam is raised to ``n_best`` so that asking for alternatives alone works."""
    defaults = info.decoding
    beam = body.beam_size if body.beam_size is not None else max(defaults.beam_size, body.n_best)
    alpha = body.length_penalty if body.length_penalty is not None else defaults.length_penalty
    patience = body.patience if body.patience is not None else defaults.patience
    return replace(
        defaults,
        beam_size=beam,
        n_best=body.n_best,
        length_penalty=alpha,
        patience=patience,
        max_length=body.max_length,
        return_attention=body.return_attention,
    )


async def translate(
    body: TranslateRequest, served: ServedModel, settings: Settings, request_id: str
) -> TranslateResponse:
    """Split, tokenize (off the event loop unless small), queue every sentence in one go, rejoin per text."""
    options = decoding_options(body, served.engine.info)
    texts, listed = body.texts, not isinstance(body.text, str)
    if sum(len(text) for text in texts) <= INLINE_CHARS:  # a thread hop costs more than tokenizing this much
        segmented, sources = _prepare(texts, served, settings.split_sentences, listed)
    else:
        segmented, sources = await asyncio.to_thread(_prepare, texts, served, settings.split_sentences, listed)
    # Tokenless sentences (nothing SentencePiece keeps) translate to "" without the engine.
    queued = [i for i, src in enumerate(sources) if src]
    budget = settings.max_attention_cells
    check = AttentionBudget(segmented, sources, queued, budget) if options.return_attention else None
    decoded = await served.batcher.translate([sources[i] for i in queued], options, request_id, check)
    results = [_empty(options)] * len(sources)
    for i, result in zip(queued, decoded, strict=True):
        results[i] = result
    if options.return_attention:
        check_attention(segmented, results, settings.max_attention_cells)
    translations, start = [], 0
    for seg in segmented:
        merged = merge(seg, results[start : start + len(seg.sentences)], body.n_best)
        translations.append(_translation(merged, body))
        start += len(seg.sentences)
    return TranslateResponse(model=served.engine.name, translations=translations)


def _empty(options: DecodingOptions) -> SentenceResult:
    attention = Attention([], [], np.zeros((0, 0)), []) if options.return_attention else None
    return SentenceResult([Candidate("", [], 0.0)], attention)


def _translation(merged: TextResult, body: TranslateRequest) -> Translation:
    out = Translation(text=merged.text)
    if body.return_scores:
        out.score = merged.score
    if body.n_best > 1:
        out.alternatives = [Alternative(text=text, score=score) for text, score in merged.alternatives]
    if body.return_attention and merged.attention is not None:  # a blank text has an empty one either way
        a = merged.attention
        out.attention = AttentionOut(
            source_tokens=a.source_tokens,
            target_tokens=a.target_tokens,
            weights=a.weights.tolist(),
            alignment=[list(pair) for pair in a.alignment],
        )
    return out
