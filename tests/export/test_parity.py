"""Validation steps 2 and 3: ONNX step == torch step at unseen shapes; ONNX beam search == torch, token for token."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import pytest

from export.calibrate import calibration_feeds
from export.validate import PARITY_SHAPES, TOLERANCES, compare_translations, step_parity
from model.decode import translate_ids
from model.decoding import DecodingOptions
from model.manifest import STATIC_SCALES, read_manifest, resolve_variant
from model.runtime import OrtModel
from model.tokenizer import Tokenizer
from model.torch_step import TorchStepFunction
from model.transformer import Transformer
from model.weights import load_model


@pytest.fixture(scope="module")
def torch_model(exported_model_dir: Path) -> Transformer:
    return load_model(exported_model_dir)[0]


@pytest.fixture(scope="module")
def ort_fp32(exported_model_dir: Path) -> OrtModel:
    return OrtModel.load(exported_model_dir, "fp32")


@pytest.mark.parametrize(("batch", "src_len", "past_len"), PARITY_SHAPES)
def test_step_parity_table(
    torch_model: Transformer, ort_fp32: OrtModel, batch: int, src_len: int, past_len: int, record_property
) -> None:
    parity = step_parity(
        partial(TorchStepFunction, torch_model),
        ort_fp32.step_function,
        torch_model.config.vocab_size,
        shapes=((batch, src_len, past_len),),
    )
    (case,) = parity.cases
    record_property("max_abs_diff_log_probs", case.log_probs_diff)
    assert case.log_probs_diff <= TOLERANCES["fp32"] == 1e-4
    assert case.cross_attn_diff <= 1e-5


def test_beam_search_over_onnx_equals_torch_token_for_token(
    exported_model_dir: Path, torch_model: Transformer, ort_fp32: OrtModel, copy_sources: list[str]
) -> None:
    tokenizer = Tokenizer(exported_model_dir / "spm.model")
    sources = tokenizer.encode_batch(copy_sources)
    cfg = torch_model.config
    search = DecodingOptions(beam_size=4)
    reference = translate_ids(partial(TorchStepFunction, torch_model), sources, cfg, search, batch_size=16)
    onnx_out = translate_ids(ort_fp32.step_function, sources, cfg, search, batch_size=16)
    parity = compare_translations(reference, onnx_out)
    assert parity.identical == parity.sentences == len(copy_sources), parity.differences[:3]
    # The trained model copies: the comparison is over real translations, not degenerate ones.
    copied = sum(tokenizer.decode(ids) == text for ids, text in zip(reference, copy_sources, strict=True))
    assert copied >= 0.9 * len(copy_sources)


@pytest.mark.parametrize("variant", ["int8", "fp16"])
def test_variant_loads_runs_and_stays_within_its_tolerance(
    exported_model_dir: Path, torch_model: Transformer, variant: str, copy_sources: list[str]
) -> None:
    model = OrtModel.load(exported_model_dir, variant)
    assert model.cache_dtype == np.dtype("float16" if variant == "fp16" else "float32")
    parity = step_parity(
        partial(TorchStepFunction, torch_model), model.step_function, torch_model.config.vocab_size, variant
    )
    assert not parity.failed, parity.cases
    tokenizer = Tokenizer(exported_model_dir / "spm.model")
    out = translate_ids(model.step_function, tokenizer.encode_batch(copy_sources[:8]), torch_model.config)
    assert tokenizer.decode_batch(out) == copy_sources[:8]


def test_int8_translation_does_not_depend_on_the_batch(exported_model_dir: Path, copy_sources: list[str]) -> None:
    """Static activation scales: each of 100 sentences decoded alone == decoded in batches of 16 with others."""
    model = OrtModel.load(exported_model_dir, "int8")
    tokenizer = Tokenizer(exported_model_dir / "spm.model")
    sources = tokenizer.encode_batch(copy_sources)
    assert len(sources) == 100
    alone = translate_ids(model.step_function, sources, model.config, batch_size=1)
    batched = translate_ids(model.step_function, sources, model.config, batch_size=16)
    assert alone == batched
    assert sum(tokenizer.decode(ids) == text for ids, text in zip(alone, copy_sources, strict=True)) >= 90


def test_auto_serves_int8_on_cpu_only_within_the_default_paths_loss(exported_model_dir: Path) -> None:
    manifest = read_manifest(exported_model_dir / "onnx")
    int8, fp32 = manifest["variants"]["int8"], manifest["variants"]["fp32"]
    assert int8["activation_scales"] == STATIC_SCALES
    fp32["bleu"], int8["bleu"], int8["recommended"] = 40.35, 40.25, True  # within 0.1 of fp32
    assert resolve_variant(manifest, "auto", "cpu") == "int8"
    assert resolve_variant(manifest, "fp32", "cpu") == "fp32"  # asked for: always
    assert resolve_variant(manifest, "auto", "cuda") != "int8"  # int8 is a CPU variant
    int8["bleu"] = 40.2  # recommended (within 0.5) but more than the default path may lose
    assert resolve_variant(manifest, "auto", "cpu") == "fp32"
    assert resolve_variant(manifest, "int8", "cpu") == "int8"
    int8["bleu"], int8["activation_scales"] = 40.35, "dynamic"  # batch-dependent int8 is never the default
    assert resolve_variant(manifest, "auto", "cpu") == "fp32"
    int8["activation_scales"], fp32["bleu"], int8["bleu"] = STATIC_SCALES, None, None  # exported without val set
    assert resolve_variant(manifest, "auto", "cpu") == "fp32"
    del manifest["variants"]["int8"]
    assert resolve_variant(manifest, "auto", "cpu") == "fp32"
    manifest["variants"].pop("fp16", None)
    assert resolve_variant(manifest, "auto", "cuda") == "fp32"  # no fp16 exported
    manifest["variants"]["fp16"] = {"recommended": True, "bleu": 40.3}
    assert resolve_variant(manifest, "auto", "cuda") == "fp16"
    manifest["variants"]["fp16"] = {"recommended": False, "bleu": None}  # exported without a validation set
    assert resolve_variant(manifest, "auto", "cuda") == "fp16"  # fp32 would run the attention op on the CPU there
    manifest["variants"]["fp16"] = {"recommended": False, "bleu": 39.0}  # measured: loses too much
    assert resolve_variant(manifest, "auto", "cuda") == "fp32"


def test_int8_calibration_records_each_step_as_it_was_fed(exported_model_dir: Path, copy_sources: list[str]) -> None:
    """The recorded decoder feeds are snapshots: none shares memory with another (the step function's gather
    buffers are reused from step to step, and calibration reads the feeds only after the decode)."""
    model = OrtModel.load(exported_model_dir, "fp32")
    tokenizer = Tokenizer(exported_model_dir / "spm.model")
    feeds = calibration_feeds(model, tokenizer.encode_batch(copy_sources[:16]), DecodingOptions(beam_size=4))
    arrays = [value for record in feeds["decoder"] for value in record.values() if value.size]
    assert len(feeds["decoder"]) > 10
    shared = sum(np.may_share_memory(a, b) for i, a in enumerate(arrays) for b in arrays[i + 1 :])
    assert shared == 0
