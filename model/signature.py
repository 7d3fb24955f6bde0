"""The one declaration of the ONNX graphs: input/output names, dtypes and axes, used by export and validation.

Torch-free, so the service can check the graphs it loads against the same declaration.

encoder.onnx  src_ids (batch, src_len) int64, src_pad_mask (batch, src_len) bool (True = padding)
              → cross_key_{i}, cross_value_{i} (batch, heads, src_len, head_dim) for each decoder layer i
decoder.onnx  one step: tokens (rows, 1) int64, positions (rows, 1) int64 (each row's decoding position,
              which is also its past length), top_k (k,) int64 (only its length counts: candidates per row),
              src_pad_mask (sentences, src_len) bool, past_key_{i}/past_value_{i} (rows, heads, capacity,
              head_dim) (already in the rows' order; right-padded: row r's past in slots [0, positions[r]),
              the slots after never read; capacity > every position), cross_key_{i}/cross_value_{i}
              (sentences, heads, src_len, head_dim): rows = sentences x G, the rows in blocks of G per
              sentence (a static beam search feeds one cross K/V per sentence for its beams; rows of
              different sentences mixed freely feed one per row, G = 1)
              → scores (rows, k) float32 and ids (rows, k) int64 (each row's k best log-probs, best first),
              eos_log_probs (rows,) float32, cross_attn (rows, src_len) float32 (the alignment layer, head
              mean), present_key_{i}/present_value_{i} (rows, heads, capacity, head_dim): the past with each
              row's new K/V at slot positions[r]. The self-attention is onnxruntime's
              com.microsoft.GroupQueryAttention, so a caller that binds each present to its past's buffer
              (IO binding) has the new K/V written in place: no copy of the cache per step.

Past length 0 on the first step, no control flow: one graph for every step. Rows may be at different
positions (per-row positions; each row attends to its own slots only), so sentences can join a running batch.
K/V tensors are in the variant's cache dtype (float32; float16 for the fp16 variant); log-probs and
attention are always float32.
"""

from __future__ import annotations

from dataclasses import dataclass

from model.config import ModelConfig

CACHE = "cache"  # dtype placeholder: the variant's K/V dtype
# The decoder's top-k runs over 64 to 128 groups of the vocabulary (as many as divide it evenly, so the
# log-prob table needs no padding), so a step returns at most this many candidates per row (beam 16 asks
# for 35).
MAX_CANDIDATES = 64
# Slots added to a right-padded cache buffer when a step finds it full (the step functions, ONNX and torch).
# Every gather of the cache (the beam reorder) copies the whole buffer, so a larger step copies more slots
# that no row uses yet; a smaller one grows the buffer (one more copy) more often.
CAPACITY_STEP = 4

# Variant → (encoder file, decoder file, cache dtype) inside MODEL_DIR/onnx/.
VARIANTS: dict[str, tuple[str, str, str]] = {
    "fp32": ("encoder.onnx", "decoder.onnx", "float32"),
    "int8": ("encoder.int8.onnx", "decoder.int8.onnx", "float32"),
    "fp16": ("encoder.fp16.onnx", "decoder.fp16.onnx", "float16"),
}


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: a str axis is symbolic (dynamic), an int axis is fixed."""

    name: str
    dtype: str  # numpy dtype name, or CACHE
    axes: tuple[str | int, ...]

    def resolved_dtype(self, cache_dtype: str) -> str:
        return cache_dtype if self.dtype == CACHE else self.dtype

    def dynamic_axes(self) -> dict[int, str]:
        return {i: axis for i, axis in enumerate(self.axes) if isinstance(axis, str)}


@dataclass(frozen=True)
class GraphSignature:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        return [spec.name for spec in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [spec.name for spec in self.outputs]


def kv_names(prefix: str, n_layers: int) -> list[str]:
    """``{prefix}_key_0, {prefix}_value_0, {prefix}_key_1, ...``: the flattened order of a per-layer K/V."""
    return [f"{prefix}_{kind}_{i}" for i in range(n_layers) for kind in ("key", "value")]


def _kv_specs(prefix: str, cfg: ModelConfig, rows: str, length: str) -> tuple[TensorSpec, ...]:
    axes = (rows, cfg.n_heads, length, cfg.head_dim)
    return tuple(TensorSpec(name, CACHE, axes) for name in kv_names(prefix, cfg.n_decoder_layers))


def encoder_signature(cfg: ModelConfig) -> GraphSignature:
    return GraphSignature(
        name="encoder",
        inputs=(
            TensorSpec("src_ids", "int64", ("batch", "src_len")),
            TensorSpec("src_pad_mask", "bool", ("batch", "src_len")),
        ),
        outputs=_kv_specs("cross", cfg, "batch", "src_len"),
    )


def decoder_signature(cfg: ModelConfig) -> GraphSignature:
    return GraphSignature(
        name="decoder",
        inputs=(
            TensorSpec("tokens", "int64", ("rows", 1)),
            TensorSpec("positions", "int64", ("rows", 1)),
            TensorSpec("top_k", "int64", ("k",)),
            TensorSpec("src_pad_mask", "bool", ("sentences", "src_len")),
            *_kv_specs("past", cfg, "rows", "capacity"),
            *_kv_specs("cross", cfg, "sentences", "src_len"),
        ),
        outputs=(
            TensorSpec("scores", "float32", ("rows", "k")),
            TensorSpec("ids", "int64", ("rows", "k")),
            TensorSpec("eos_log_probs", "float32", ("rows",)),
            TensorSpec("cross_attn", "float32", ("rows", "src_len")),
            *_kv_specs("present", cfg, "rows", "capacity"),
        ),
    )
