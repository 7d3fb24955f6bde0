"""Calibration feeds for static int8: the encoder and decoder inputs that decoding real sentences produces.

Static quantization fixes each activation's scale from these feeds once, at export, so a sentence's int8
translation no longer depends on the other sentences in its batch (dynamic quantization scales every
activation by the range of the whole batch). The feeds come from beam search over the fp32 graphs, so
the decoder sees the shapes and values it will see when serving: every step, beams and past lengths.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from model.decode import translate_ids
from model.decoding import DecodingOptions
from model.runtime import OrtModel, OrtStepFunction
from model.search import StepOutput

CALIBRATION_SENTENCES = 64  # enough for stable min/max ranges of the small presets, quick to decode
CALIBRATION_BATCH = 8  # sentences per batch: several row counts and past lengths among the feeds


class _Recording(OrtStepFunction):
    """The host step function, keeping a copy of every encoder and decoder feed."""

    def __init__(self, model: OrtModel, src_ids: np.ndarray, src_pad_mask: np.ndarray, feeds: dict) -> None:
        self.feeds = feeds
        super().__init__(model, src_ids, src_pad_mask)

    def _encode(self, src_ids: np.ndarray) -> list:
        self.feeds["encoder"].append({"src_ids": src_ids, "src_pad_mask": self.base_mask})
        return super()._encode(src_ids)

    def _run(self, feeds: dict[str, np.ndarray]) -> StepOutput:
        out = super()._run(feeds)  # adds the past and cross K/V to feeds
        # Copies: the past and cross K/V live in the step function's reused gather buffers, which later steps
        # overwrite, and onnxruntime reads the recorded feeds only after the whole decode.
        self.feeds["decoder"].append({name: np.array(value, copy=True) for name, value in feeds.items()})
        return out


def calibration_feeds(fp32: OrtModel, sources: Sequence[list[int]], options: DecodingOptions) -> dict[str, list]:
    """Every encoder and decoder feed of decoding ``sources`` (ids) with the fp32 graphs."""
    feeds: dict[str, list] = {"encoder": [], "decoder": []}
    sources = [s for s in sources if s][:CALIBRATION_SENTENCES]

    def make_step(src_ids: np.ndarray, src_pad_mask: np.ndarray) -> _Recording:
        return _Recording(fp32, src_ids, src_pad_mask, feeds)

    translate_ids(make_step, sources, fp32.config, options, batch_size=CALIBRATION_BATCH)
    return feeds


class FeedReader(CalibrationDataReader):
    """onnxruntime's calibration reader over recorded feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._feeds: Iterator[dict[str, np.ndarray]] = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)
