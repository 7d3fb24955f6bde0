"""mt-export's work in order: export every variant, validate (graph, step parity, beam parity), measure BLEU,
write the manifest, and only then put the result in place as MODEL_DIR/onnx/.

Everything is built in a scratch directory next to the target, so a failed run leaves an existing onnx/
untouched and a new one never half-written.
"""

from __future__ import annotations

import gzip
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from export.calibrate import calibration_feeds
from export.manifest import build_manifest, write_manifest
from export.onnx_export import EXPORTER, OPSET, export_variant
from export.validate import (
    MIN_IDENTICAL,
    BeamParity,
    StepParity,
    check_beam_parity,
    check_step_parity,
    check_variant_graphs,
    compare_translations,
    step_parity,
)
from model.config import ModelConfig
from model.decode import score_translations, translate_ids
from model.decoding import DecodingOptions
from model.manifest import STATIC_SCALES
from model.model_dir import ModelDirError, read_model_dir
from model.runtime import OrtModel
from model.signature import VARIANTS
from model.tokenizer import Tokenizer, load_tokenizer
from model.torch_step import TorchStepFunction
from model.transformer import Transformer
from model.weights import load_model

logger = logging.getLogger(__name__)

MAX_BLEU_LOSS = 0.5  # a variant that loses more BLEU than this against fp32 is not recommended
# fp32 BLEU below this means the model translates nothing: no variant is recommended for it, and it says so.
MIN_USEFUL_BLEU = 1.0
INTENDED_FOR = {"fp32": "CPU or CUDA", "int8": "CPUExecutionProvider", "fp16": "CUDAExecutionProvider"}


def read_lines(path: Path) -> list[str]:
    """Lines of a plain or gzip-compressed (``.gz``) UTF-8 text file."""
    if path.suffix == ".gz":
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return f.read().splitlines()
    return path.read_text(encoding="utf-8").splitlines()


class OutputExistsError(FileExistsError):
    """MODEL_DIR/onnx/ exists and --force was not given."""


class ExportInputError(ValueError):
    """The arguments cannot work (validation files missing or mismatched); the message lists every problem."""


@dataclass(frozen=True)
class ExportRequest:
    model_dir: Path
    variants: tuple[str, ...] = ("fp32",)  # fp32 is always exported; int8 derives from it
    force: bool = False
    valid_src: Path | None = None
    valid_ref: Path | None = None
    max_sentences: int | None = None  # cap on validation sentences (all when None)
    random_sentences: int = 64  # beam-parity sources when no validation set is given
    batch_size: int = 32
    search: DecodingOptions | None = None  # None: the model dir's decoding defaults (model.json), as served


def _check_request(request: ExportRequest, target: Path) -> None:
    if target.exists() and not request.force:
        raise OutputExistsError(f"{target} already exists: add --force to replace it")
    problems = []
    if (request.valid_src is None) != (request.valid_ref is None):
        problems.append("--valid-src and --valid-ref go together: give both or neither")
    for path in (request.valid_src, request.valid_ref):
        if path is not None and not path.is_file():
            problems.append(f"validation file not found: {path}")
    if not problems and request.valid_src is not None:
        n_src, n_ref = len(read_lines(request.valid_src)), len(read_lines(request.valid_ref))
        if n_src != n_ref or n_src == 0:
            problems.append(f"{request.valid_src} has {n_src} lines and {request.valid_ref} {n_ref}: need equal, >0")
    if request.max_sentences is not None and request.max_sentences < 1:
        problems.append(f"--max-sentences must be at least 1, got {request.max_sentences}")
    unknown = [v for v in request.variants if v not in VARIANTS]
    if unknown:
        problems.append(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
    if problems:
        raise ExportInputError("; ".join(problems))


def _sources(request: ExportRequest, tokenizer: Tokenizer) -> tuple[list[list[int]], list[str] | None, str]:
    """Beam-parity / BLEU sources as ids, the references (if any), and a description for the manifest."""
    if request.valid_src is None:
        count = min(request.random_sentences, request.max_sentences or request.random_sentences)
        rng = np.random.default_rng(0)
        ids = [[int(t) for t in rng.integers(4, tokenizer.vocab_size, n)] for n in rng.integers(1, 31, count)]
        return ids, None, f"{count} random token-id sequences (no --valid-src given)"
    texts = read_lines(request.valid_src)[: request.max_sentences]
    refs = read_lines(request.valid_ref)[: request.max_sentences]
    return tokenizer.encode_batch(texts), refs, str(request.valid_src)


def _providers(variant: str) -> list[str]:
    if variant == "fp16" and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _recommendation(variant: str, bleu: float | None, fp32_bleu: float | None) -> tuple[bool, str]:
    if variant == "fp32":
        return True, "reference variant"
    if bleu is None or fp32_bleu is None:
        return False, "BLEU not measured: run with --valid-src and --valid-ref to qualify this variant"
    if fp32_bleu < MIN_USEFUL_BLEU:
        return False, f"fp32 BLEU {fp32_bleu:.2f} is below {MIN_USEFUL_BLEU}: the model is not useful yet"
    loss = fp32_bleu - bleu
    if loss > MAX_BLEU_LOSS:
        return False, f"loses {loss:.2f} BLEU against fp32 (more than {MAX_BLEU_LOSS})"
    return True, f"within {MAX_BLEU_LOSS} BLEU of fp32 ({-loss:+.2f})"


def _publish(work: Path, target: Path) -> None:
    """Swap the finished scratch directory in as ``target`` (an existing one is removed after the swap)."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=".onnx-old-", dir=target.parent))
        os.replace(target, old / "onnx")
    os.replace(work, target)
    if old is not None:
        shutil.rmtree(old)


def run_export(request: ExportRequest) -> dict[str, Any]:
    """Export, validate and publish; returns the manifest written to MODEL_DIR/onnx/manifest.json."""
    info = read_model_dir(request.model_dir)
    # Validate with the decoding the service will use (MT_VARIANT=auto compares the variants' BLEU under it).
    request = replace(request, search=request.search or info.decoding)
    target = info.path / "onnx"
    _check_request(request, target)
    variants = ["fp32", *(v for v in ("int8", "fp16") if v in request.variants)]
    model, _ = load_model(info.path)
    tokenizer = load_tokenizer(info)
    if tokenizer.vocab_size != info.config.vocab_size:
        raise ModelDirError(
            f"{info.tokenizer_file} has {tokenizer.vocab_size} pieces but model.json says vocab_size "
            f"{info.config.vocab_size}: the directory mixes files from different runs"
        )
    work = Path(tempfile.mkdtemp(prefix=".onnx-", dir=info.path))
    work.chmod(0o755)  # mkdtemp makes it private; the server may run as another user
    try:
        sources = _sources(request, tokenizer)
        sessions = _export_and_check_graphs(model, info.config, variants, work, sources[0], request.search)
        measured = _measure(request, model, tokenizer, sessions, sources)
        manifest = _write_manifest(work, info.name, request, measured)
        _publish(work, target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    logger.info("wrote %s", target)
    return manifest


def _export_and_check_graphs(
    model: Transformer,
    cfg: ModelConfig,
    variants: list[str],
    work: Path,
    calibration_sources: list[list[int]],
    search: DecodingOptions,
) -> dict[str, OrtModel]:
    """Export every variant (int8 calibrated on the fp32 graphs decoding the validation sources), run
    validation step 1 on each, and open their sessions."""
    sessions: dict[str, OrtModel] = {}
    for variant in variants:
        calibration = None
        if variant == "int8":
            calibration = calibration_feeds(sessions["fp32"], calibration_sources, search)
        export_variant(model, work, variant, calibration)
        if variant == "fp32":
            sessions["fp32"] = OrtModel.from_files(work / VARIANTS["fp32"][0], work / VARIANTS["fp32"][1], cfg)
    logger.info("step 1/3: graphs against the declared signature")
    for variant in variants:
        check_variant_graphs(work, cfg, variant)
    return {
        v: OrtModel.from_files(work / VARIANTS[v][0], work / VARIANTS[v][1], cfg, v, _providers(v)) for v in variants
    }


@dataclass(frozen=True)
class Measurements:
    parity: dict[str, StepParity]
    beams: dict[str, BeamParity]  # per variant, against torch
    bleu: dict[str, float | None]  # "torch" and each variant
    bleu_signature: str | None
    sources: str  # where the beam-parity / BLEU sentences came from
    sentences: int
    providers: dict[str, str]  # the provider each variant was validated with
    decode: Callable[[list[int]], str]


def _measure(
    request: ExportRequest,
    model: Transformer,
    tokenizer: Tokenizer,
    sessions: dict[str, OrtModel],
    sourced: tuple[list[list[int]], list[str] | None, str],
) -> Measurements:
    """Validation steps 2 and 3 for every variant (fp32 must pass step 3), then BLEU when references exist."""
    cfg = model.config
    torch_step = partial(TorchStepFunction, model)
    logger.info("step 2/3: step parity against torch")
    parity = {}
    for variant, session in sessions.items():
        parity[variant] = step_parity(torch_step, session.step_function, cfg.vocab_size, variant)
        logger.info("%s: max abs diff of log-probs %.3g", variant, parity[variant].max_abs_diff)
        check_step_parity(parity[variant])
    logger.info("step 3/3: beam search over ONNX against torch")
    sources, refs, description = sourced
    factories = {"torch": torch_step, **{v: s.step_function for v, s in sessions.items()}}
    outputs = {
        name: translate_ids(make_step, sources, cfg, request.search, request.batch_size)
        for name, make_step in factories.items()
    }
    beams = {v: compare_translations(outputs["torch"], outputs[v]) for v in sessions}
    for variant, beam in beams.items():
        logger.info("%s: %d/%d sentences identical to torch", variant, beam.identical, beam.sentences)
    check_beam_parity(beams["fp32"])
    bleu: dict[str, float | None] = dict.fromkeys(outputs)
    signature = None
    if refs is not None:
        for name, ids in outputs.items():
            scores = score_translations(tokenizer.decode_batch(ids), refs)
            bleu[name], signature = scores["bleu"], scores["bleu_signature"]
    providers = {v: s.decoder.get_providers()[0] for v, s in sessions.items()}
    return Measurements(parity, beams, bleu, signature, description, len(sources), providers, tokenizer.decode)


def useless_model_warning(bleu: float | None) -> str | None:
    """The warning for a model whose validation BLEU says it does not translate (None when BLEU is fine)."""
    if bleu is None or bleu >= MIN_USEFUL_BLEU:
        return None
    return (
        f"validation BLEU of fp32 is {bleu:.2f} (below {MIN_USEFUL_BLEU}): this model does not translate yet; "
        "train longer or check the data before serving it"
    )


def _write_manifest(work: Path, model_name: str, request: ExportRequest, m: Measurements) -> dict[str, Any]:
    warning = useless_model_warning(m.bleu["fp32"])
    if warning:
        logger.warning(warning)
    entries = {}
    for variant in m.parity:
        recommended, reason = _recommendation(variant, m.bleu[variant], m.bleu["fp32"])
        entries[variant] = {
            "files": {"encoder": VARIANTS[variant][0], "decoder": VARIANTS[variant][1]},
            "cache_dtype": VARIANTS[variant][2],
            "intended_for": INTENDED_FOR[variant],
            "validated_with": m.providers[variant],
            "step_parity": m.parity[variant].to_dict(),
            "beam_parity": m.beams[variant].to_dict(m.decode),
            "bleu": m.bleu[variant],
            "recommended": recommended,
            "reason": reason,
        }
        if variant == "int8":
            entries[variant]["activation_scales"] = STATIC_SCALES
    evaluation = {
        "sources": m.sources,
        "sentences": m.sentences,
        "search": {k: getattr(request.search, k) for k in ("beam_size", "length_penalty", "max_length_offset")},
        "torch_bleu": m.bleu["torch"],
        "bleu_signature": m.bleu_signature,
        "beam_parity_required": f"fp32 identical to torch on at least {MIN_IDENTICAL:.1%} of sentences",
        "warning": warning,
    }
    manifest = build_manifest(
        work, model_name=model_name, exporter=EXPORTER, opset=OPSET, variants=entries, evaluation=evaluation
    )
    write_manifest(work, manifest)
    return manifest
