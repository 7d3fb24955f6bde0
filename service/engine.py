"""The translation engine: one model dir's ONNX sessions and tokenizer, decoding batches of sentences.

No FastAPI and no torch here: the engine is plain Python over onnxruntime and ``model/search.py``, used by
the batcher's worker thread, the benchmark and the tests alike. On CUDA the decoder cache stays on the
device between steps (``IoBindingStepFunction``); on CPU host buffers are fed back (``OrtStepFunction``).

The service decodes through :meth:`Engine.open_batch` (continuous batching: sentences join and leave a
running batch at every step, ``model/continuous.py``, over host buffers on every device);
:meth:`Engine.translate_batch` decodes one static batch (benchmarks, the batcher's per-request retry after
a failed step).

Attention, when asked for, is the decoder's alignment-layer cross-attention (head mean), one row per
generated target token. The column of the source EOS is left out and every row renormalised over the shown
source tokens, so rows still sum to 1.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument, InvalidGraph, InvalidProtobuf, NoSuchFile

from model.continuous import ContinuousBatch, OrtRowStep
from model.decode import search_batch
from model.decoding import PAPER, DecodingOptions
from model.manifest import check_model_dir
from model.model_dir import ModelDirError, ModelInfo
from model.runtime import CPU, IoBindingStepFunction, OrtModel, OrtModelError, OrtStepFunction, session_options
from model.tokenizer import Tokenizer, pad_sources

logger = logging.getLogger(__name__)

CUDA_PROVIDER = "CUDAExecutionProvider"
WORD_START = "\u2581"  # SentencePiece's word-boundary marker "▁"


@dataclass(frozen=True)
class Candidate:
    """One translation of a sentence: its text, subword ids and ranking score (log p / length penalty)."""

    text: str
    tokens: list[int]
    score: float


@dataclass(frozen=True)
class Attention:
    """Cross-attention of the best hypothesis: weights (target tokens, source tokens), rows summing to 1."""

    source_tokens: list[str]
    target_tokens: list[str]
    weights: np.ndarray
    alignment: list[tuple[int, int]]  # (source word, target word), one per target word


@dataclass(frozen=True)
class SentenceResult:
    candidates: list[Candidate]  # best first
    attention: Attention | None = None


class EngineError(RuntimeError):
    """A model dir that cannot be served as asked; the message names the file or setting to change."""


class SentenceTooLong(ValueError):
    """A sentence has more subword tokens than the model's positions allow (413 in the service)."""

    def __init__(self, index: int, length: int, limit: int, model: str) -> None:
        self.index, self.length, self.limit, self.model = index, length, limit, model
        super().__init__(
            f"a sentence has {length} subword tokens; model {model} reads at most {limit} per sentence: "
            "split it into shorter sentences"
        )


def available_devices() -> list[str]:
    return ["cuda", "cpu"] if CUDA_PROVIDER in ort.get_available_providers() else ["cpu"]


def resolve_device(device: str) -> str:
    """``auto`` → cuda when onnxruntime has the CUDA provider, else cpu; ``cuda`` without it is an error."""
    if device == "auto":
        return available_devices()[0]
    if device == "cuda" and "cuda" not in available_devices():
        raise EngineError(
            "MT_DEVICE=cuda but onnxruntime has no CUDAExecutionProvider: install onnxruntime-gpu "
            "(the `gpu` extra) or set MT_DEVICE=cpu"
        )
    return device


class Engine:
    """Decodes batches of tokenized sentences with one model. Its sessions may run on several threads at once
    (onnxruntime sessions are thread-safe: the service's decode loops share them); each batch belongs to one thread."""

    def __init__(self, info: ModelInfo, ort_model: OrtModel, tokenizer: Tokenizer, device: str) -> None:
        self.info = info
        self.ort_model = ort_model
        self.tokenizer = tokenizer
        self.device = device
        self.max_positions = info.config.max_positions

    @classmethod
    def load(cls, model_dir: str | Path, *, device: str = "auto", variant: str = "auto", threads: int = 0) -> Engine:
        device = resolve_device(device)
        checked = check_model_dir(model_dir, variant, device)  # hashes only files not yet verified in this process
        info, chosen, tokenizer = checked.info, checked.variant, checked.tokenizer
        providers = [CUDA_PROVIDER, *CPU] if device == "cuda" else list(CPU)
        try:
            ort_model = OrtModel.load(info.path, chosen, providers, session_options(threads))
        except (OrtModelError, Fail, InvalidArgument, InvalidGraph, InvalidProtobuf, NoSuchFile) as e:
            raise ModelDirError(f"{info.path / 'onnx'}: cannot load the {chosen} graphs: {e}") from e
        logger.info(
            "model %s (%s→%s): device=%s (%s%s), variant=%s, intra-op threads=%s",
            info.name,
            info.source_lang,
            info.target_lang,
            device,
            ort_model.decoder.get_providers()[0],
            ", IO binding" if device == "cuda" else "",
            chosen,
            threads or "onnxruntime default",
        )
        return cls(info, ort_model, tokenizer, device)

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def variant(self) -> str:
        return self.ort_model.variant

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Subword ids of each text; SentenceTooLong for the first one longer than the model's positions allow
        (EOS included), never a silently cut source (its translation would miss the end)."""
        limit = self.max_positions - 1
        encoded = self.tokenizer.encode_batch(list(texts))
        for i, ids in enumerate(encoded):
            if len(ids) > limit:
                raise SentenceTooLong(i, len(ids), limit, self.name)
        return encoded

    def translate_batch(self, sources: Sequence[Sequence[int]], options: DecodingOptions) -> list[SentenceResult]:
        """Decode one batch of non-empty tokenized sources; one result per source, in order."""
        if not sources:
            return []
        cfg = self.info.config
        ids, mask = pad_sources([list(s) for s in sources], None, cfg.pad_id, cfg.eos_id)  # (B, S), True = padding
        if self.device == "cuda":
            step_fn: OrtStepFunction = IoBindingStepFunction(self.ort_model, ids, mask, device="cuda")
        else:
            step_fn = self.ort_model.step_function(ids, mask)
        hypotheses = search_batch(step_fn, [len(s) for s in sources], self.info.config, options)
        return [self._result(src, hyps, options) for src, hyps in zip(sources, hypotheses, strict=True)]

    def open_batch(self) -> EngineBatch:
        """A new, empty running decoder batch over this engine's sessions (continuous batching)."""
        return EngineBatch(self)

    def translate(self, texts: Sequence[str], options: DecodingOptions, max_batch_tokens: int = 4096) -> list[str]:
        """Best translation of each text, decoded in length-sorted batches of ``max_batch_tokens`` (no splitting)."""
        sources = self.encode(texts)
        out = [""] * len(sources)
        for batch in plan_batches([len(s) for s in sources], options.beam_size, max_batch_tokens):
            batch = [i for i in batch if sources[i]]
            results = self.translate_batch([sources[i] for i in batch], options)
            for i, result in zip(batch, results, strict=True):
                out[i] = result.candidates[0].text if result.candidates else ""
        return out

    def warmup(self) -> None:
        """Decode one short sentence, so that the first request does not pay for session initialisation."""
        self.translate_batch([self.encode(["warm up"])[0] or [self.tokenizer.unk_id]], PAPER)

    def _result(self, src: Sequence[int], hyps: list, options: DecodingOptions) -> SentenceResult:
        candidates = [Candidate(self.tokenizer.decode(h.tokens), list(h.tokens), float(h.score)) for h in hyps]
        attention = None
        if options.return_attention and hyps:
            best = hyps[0]
            weights = best.attention if best.attention is not None else np.zeros((len(best.tokens), len(src)))
            attention = self.attention(src, best.tokens, weights)
        return SentenceResult(candidates, attention)

    def attention(self, src: Sequence[int], tgt: Sequence[int], weights: np.ndarray) -> Attention:
        """Attention over the shown source tokens (EOS column dropped, rows renormalised) and word alignment."""
        shown = np.asarray(weights, dtype=np.float64)[: len(tgt), : len(src)]  # (T, S_src)
        totals = shown.sum(axis=1, keepdims=True)
        uniform = np.full_like(shown, 1.0 / max(len(src), 1))
        shown = np.where(totals > 0, shown / np.where(totals > 0, totals, 1.0), uniform)
        source_tokens, target_tokens = self.tokenizer.pieces(list(src)), self.tokenizer.pieces(list(tgt))
        return Attention(source_tokens, target_tokens, shown, word_alignment(source_tokens, target_tokens, shown))


class EngineBatch:
    """The running decoder batch of an engine: sentences are admitted and dropped between steps, and each step
    returns the sentences that finished, as :class:`SentenceResult` (use from the engine's thread only)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.batch = ContinuousBatch(OrtRowStep(engine.ort_model), engine.info.config)
        self.sources: dict[object, tuple[list[int], DecodingOptions]] = {}  # every admitted, unfinished sentence
        self.last_rows = 0  # rows of the last decoder call

    @property
    def live_rows(self) -> int:
        return self.batch.live_rows

    @property
    def idle(self) -> bool:
        return self.batch.idle

    def keys(self) -> list:
        """The keys of every sentence admitted and not yet finished or dropped."""
        return list(self.sources)

    def admit(self, key: object, source: Sequence[int], options: DecodingOptions) -> None:
        """Queue a tokenized, non-empty sentence to join at the next step; ``key`` comes back with its result."""
        source = list(source)
        self.batch.admit(key, source, options)
        self.sources[key] = (source, options)

    def drop(self, keys: set) -> None:
        """Cancel these sentences (queued or live); their rows are freed before the next step."""
        self.batch.drop(keys)
        for key in keys:
            self.sources.pop(key, None)

    def step(self) -> list[tuple[object, SentenceResult]]:
        """One decoder call over every live row (newcomers encoded and joined first); the finished sentences."""
        self.last_rows = self.batch.live_rows + len(self.batch.pending)  # each newcomer joins with one BOS row
        out = []
        for key, hyps in self.batch.step():
            source, options = self.sources.pop(key)
            out.append((key, self.engine._result(source, hyps, options)))
        return out


def word_index(pieces: Sequence[str]) -> np.ndarray:
    """The word of each subword piece: a piece starting with "▁" starts a new word."""
    starts = np.array([i > 0 and piece.startswith(WORD_START) for i, piece in enumerate(pieces)], dtype=np.int64)
    return np.cumsum(starts)


def word_alignment(source: Sequence[str], target: Sequence[str], weights: np.ndarray) -> list[tuple[int, int]]:
    """For each target word, the source word with the most attention (subword weights summed both ways)."""
    if not len(source) or not len(target):
        return []
    src_words, tgt_words = word_index(source), word_index(target)
    summed = np.zeros((tgt_words[-1] + 1, src_words[-1] + 1))  # (target words, source words)
    np.add.at(summed, (tgt_words[:, None], src_words[None, :]), weights)
    return [(int(np.argmax(row)), j) for j, row in enumerate(summed)]


def batch_cost(longest: int, n_sentences: int, beam_size: int) -> int:
    """Tokens a batch occupies: padded source length (EOS included) x sentences x beam."""
    return (longest + 1) * n_sentences * beam_size


def plan_batches(lengths: Sequence[int], beam_size: int, max_tokens: int) -> list[list[int]]:
    """Indices grouped into length-sorted batches within ``max_tokens`` (a batch holds at least one)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        if current and batch_cost(lengths[i], len(current) + 1, beam_size) > max_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches
