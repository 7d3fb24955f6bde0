"""Validation of exported graphs in ordered steps, each failing with its own error class.

1. Graph: ``onnx.checker`` passes (:class:`GraphCheckError`); input/output names and dtypes are the ones
   ``model.signature`` declares (:class:`SignatureError`); every declared dynamic axis is symbolic and
   carries its declared name, not a number fixed at export (:class:`DynamicAxesError`).
2. Step parity: the ONNX step function against the torch one, driven through the same scripted steps
   (beam expansion, reordering, a finished sentence dropped) at shapes other than the export example;
   the max abs difference of log-probs must stay within the variant's tolerance (:class:`StepParityError`).
3. Beam parity: beam search (``model.search``) over both step functions gives the same tokens for (almost)
   every sentence (:class:`BeamParityError`).

Step functions come in as factories, so this module runs without importing torch itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto

from model.config import BOS_ID, ModelConfig
from model.decode import StepFactory
from model.signature import VARIANTS, GraphSignature, TensorSpec, decoder_signature, encoder_signature
from model.tokenizer import pad_sources

# Shapes (batch, source length incl. EOS, past length) of the parity table: none is the export example's.
PARITY_SHAPES: tuple[tuple[int, int, int], ...] = tuple((b, s, p) for b in (1, 5) for s in (1, 37) for p in (0, 11))
# Max abs difference of log-probs allowed per variant. fp16 rounds activations to 11 significant bits;
# int8 quantizes every weight matrix and its activation scales are calibrated on real decoding, while these
# scripted steps feed random tokens (activations outside the calibrated ranges get clipped), so its figure
# is a sanity bound (a broken graph is off by several nats) and BLEU is its real measure. 2 nats, not 1: the
# tests' tiny copy model (d_model 32) reached 1.02 on the random tokens of a 37-token source (2026-12).
TOLERANCES = {"fp32": 1e-4, "fp16": 5e-2, "int8": 2.0}
PARITY_K = 8  # candidates per row compared by step parity (beam 4's 2K)
MIN_IDENTICAL = 0.995  # share of sentences whose ONNX beam search must equal torch's (fp32)

_ONNX_DTYPES = {
    "int64": TensorProto.INT64,
    "bool": TensorProto.BOOL,
    "float32": TensorProto.FLOAT,
    "float16": TensorProto.FLOAT16,
}


class ValidationError(Exception):
    """An exported graph failed validation; subclasses name the step."""


class GraphCheckError(ValidationError):
    """Step 1: onnx.checker rejected the file."""


class SignatureError(ValidationError):
    """Step 1: input/output names, dtypes or fixed sizes differ from ``model.signature``."""


class DynamicAxesError(ValidationError):
    """Step 1: an axis declared dynamic is a fixed number in the graph, or carries another name."""


class StepParityError(ValidationError):
    """Step 2: ONNX log-probs differ from torch's by more than the variant's tolerance."""


class BeamParityError(ValidationError):
    """Step 3: beam search over ONNX gives different tokens than over torch for too many sentences."""


# ---- step 1: the graph against its declaration ----


def check_graph(path: Path, signature: GraphSignature, cache_dtype: str = "float32") -> None:
    """Raise the first failing check's error, listing every problem of that check."""
    model = onnx.load(str(path))
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        raise GraphCheckError(f"{path}: onnx.checker rejects the graph: {error}") from error
    graph_inputs = {v.name: v for v in model.graph.input}
    graph_outputs = {v.name: v for v in model.graph.output}
    got_in, got_out = list(graph_inputs), list(graph_outputs)
    if got_in != signature.input_names or got_out != signature.output_names:
        raise SignatureError(
            f"{path}: graph names differ from the declared {signature.name} signature: "
            f"inputs {got_in} (declared {signature.input_names}), "
            f"outputs {got_out} (declared {signature.output_names})"
        )
    specs = [(spec, graph_inputs[spec.name]) for spec in signature.inputs]
    specs += [(spec, graph_outputs[spec.name]) for spec in signature.outputs]
    type_problems, axis_problems = [], []
    for spec, value in specs:
        types, axes = _spec_problems(spec, value, cache_dtype)
        type_problems += types
        axis_problems += axes
    if type_problems:
        raise SignatureError(f"{path}: " + "; ".join(type_problems))
    if axis_problems:
        raise DynamicAxesError(f"{path}: " + "; ".join(axis_problems))


def _spec_problems(spec: TensorSpec, value: onnx.ValueInfoProto, cache_dtype: str) -> tuple[list[str], list[str]]:
    tensor = value.type.tensor_type
    dtype = spec.resolved_dtype(cache_dtype)
    types: list[str] = []
    if tensor.elem_type != _ONNX_DTYPES[dtype]:
        types.append(f"{spec.name} is {TensorProto.DataType.Name(tensor.elem_type)}, declared {dtype}")
    dims = list(tensor.shape.dim)
    if len(dims) != len(spec.axes):
        return [*types, f"{spec.name} has rank {len(dims)}, declared {spec.axes}"], []
    axes: list[str] = []
    for i, (dim, declared) in enumerate(zip(dims, spec.axes, strict=True)):
        if isinstance(declared, int):
            if dim.dim_value != declared:
                types.append(f"axis {i} of {spec.name} is {dim.dim_value or dim.dim_param!r}, declared {declared}")
        elif dim.HasField("dim_value"):
            axes.append(f"axis {i} of {spec.name} is fixed to {dim.dim_value}, declared dynamic {declared!r}")
        elif dim.dim_param != declared:
            axes.append(f"axis {i} of {spec.name} is named {dim.dim_param!r}, declared {declared!r}")
    return types, axes


def check_variant_graphs(onnx_dir: Path, config: ModelConfig, variant: str) -> None:
    """Step 1 for both graphs of one variant."""
    enc_file, dec_file, cache_dtype = VARIANTS[variant]
    check_graph(onnx_dir / enc_file, encoder_signature(config), cache_dtype)
    check_graph(onnx_dir / dec_file, decoder_signature(config), cache_dtype)


# ---- step 2: step parity ----


@dataclass(frozen=True)
class ParityCase:
    batch: int
    src_len: int
    past_len: int
    log_probs_diff: float  # max abs difference over every step of the case (past lengths 0 .. past_len)
    cross_attn_diff: float


@dataclass(frozen=True)
class StepParity:
    variant: str
    tolerance: float
    cases: tuple[ParityCase, ...]

    @property
    def max_abs_diff(self) -> float:
        return max(c.log_probs_diff for c in self.cases)

    @property
    def failed(self) -> list[ParityCase]:
        return [c for c in self.cases if not c.log_probs_diff <= self.tolerance]  # NaN fails too

    def to_dict(self) -> dict[str, Any]:
        return {
            "tolerance": self.tolerance,
            "max_abs_diff_log_probs": self.max_abs_diff,
            "passed": not self.failed,
            "cases": [vars(c) for c in self.cases],
        }


def _scripted_steps(
    batch: int, src_len: int, past_len: int, vocab_size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, list[tuple[np.ndarray, np.ndarray | None]]]:
    """A source batch and the (tokens, reorder) of past_len + 1 calls, as a beam search of 2 would make them.

    Sentence 0 fills the source length, the others are shorter (padding). Step 1 expands each sentence to
    two rows, later steps pick parents within each sentence, and step 6 drops sentence 0 (finished).
    """
    lengths = [src_len - 1, *rng.integers(0, src_len, batch - 1)]
    src_ids, src_mask = pad_sources([list(rng.integers(4, vocab_size, n)) for n in lengths])
    calls: list[tuple[np.ndarray, np.ndarray | None]] = [(np.full(batch, BOS_ID, dtype=np.int64), None)]
    row_sentence, live = np.arange(batch), list(range(batch))
    for step in range(1, past_len + 1):
        if step == 6 and len(live) > 1:
            live = live[1:]
        reorder = np.concatenate([rng.choice(np.flatnonzero(row_sentence == s), 2) for s in live])
        row_sentence = row_sentence[reorder]
        calls.append((rng.integers(4, vocab_size, reorder.size), reorder))
    return src_ids, src_mask, calls


def step_parity(
    reference: StepFactory,
    candidate: StepFactory,
    vocab_size: int,
    variant: str = "fp32",
    shapes: tuple[tuple[int, int, int], ...] = PARITY_SHAPES,
    seed: int = 0,
) -> StepParity:
    """Drive both step functions through the same scripted calls per shape; record the largest differences."""
    rng = np.random.default_rng(seed)
    cases = []
    for batch, src_len, past_len in shapes:
        src_ids, src_mask, calls = _scripted_steps(batch, src_len, past_len, vocab_size, rng)
        ref_fn, cand_fn = reference(src_ids, src_mask), candidate(src_ids, src_mask)
        lp_diff = attn_diff = 0.0
        for step, (tokens, reorder) in enumerate(calls):
            ref, cand = ref_fn(tokens, step, reorder, PARITY_K), cand_fn(tokens, step, reorder, PARITY_K)
            # The k best log-probs of each row, rank by rank, and the EOS log-prob (the candidates' ids agree
            # too wherever no two are within the difference: beam parity checks the tokens).
            lp_diff = max(lp_diff, _max_diff(ref.scores, cand.scores), _max_diff(ref.eos_log_probs, cand.eos_log_probs))
            attn_diff = max(attn_diff, _max_diff(ref.cross_attn, cand.cross_attn))
        cases.append(ParityCase(batch, src_len, past_len, lp_diff, attn_diff))
    return StepParity(variant, TOLERANCES[variant], tuple(cases))


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


def check_step_parity(parity: StepParity) -> None:
    if parity.failed:
        rows = "; ".join(
            f"batch {c.batch}, src_len {c.src_len}, past_len {c.past_len}: {c.log_probs_diff:.3g}"
            for c in parity.failed
        )
        advice = (
            "the exported graph does not compute what the network does: check export/wrappers.py"
            if parity.variant == "fp32"
            else f"this model does not tolerate {parity.variant}: export without --{parity.variant}"
        )
        raise StepParityError(
            f"{parity.variant}: log-probs differ from torch by more than {parity.tolerance:g} ({rows}); {advice}"
        )


# ---- step 3: beam parity ----


@dataclass(frozen=True)
class Difference:
    index: int  # the sentence's position in the input
    reference: list[int]  # torch's tokens
    candidate: list[int]  # the ONNX variant's tokens


@dataclass(frozen=True)
class BeamParity:
    sentences: int
    identical: int
    differences: tuple[Difference, ...]

    @property
    def fraction(self) -> float:
        return self.identical / self.sentences if self.sentences else 1.0

    def to_dict(self, decode: Callable[[list[int]], str] | None = None) -> dict[str, Any]:
        def show(tokens: list[int]) -> str | list[int]:
            return decode(tokens) if decode else tokens

        return {
            "sentences": self.sentences,
            "identical": self.identical,
            "fraction_identical": round(self.fraction, 6),
            "differences": [
                {"index": d.index, "torch": show(d.reference), "onnx": show(d.candidate)} for d in self.differences
            ],
        }


def compare_translations(reference: list[list[int]], candidate: list[list[int]]) -> BeamParity:
    if len(reference) != len(candidate):
        raise ValueError(f"{len(reference)} reference translations but {len(candidate)} candidates")
    differences = tuple(
        Difference(i, ref, cand) for i, (ref, cand) in enumerate(zip(reference, candidate, strict=True)) if ref != cand
    )
    return BeamParity(len(reference), len(reference) - len(differences), differences)


def check_beam_parity(parity: BeamParity, min_identical: float = MIN_IDENTICAL) -> None:
    if parity.fraction < min_identical:
        shown = ", ".join(str(d.index) for d in parity.differences[:10])
        raise BeamParityError(
            f"beam search over ONNX matches torch on {parity.identical}/{parity.sentences} sentences "
            f"({parity.fraction:.2%}, at least {min_identical:.1%} needed); first differing sentences: {shown}"
        )
