"""The network's configuration: one frozen dataclass, validated on creation, with the paper's presets."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

# Special token ids, shared by the SentencePiece model, the network and the search.
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


# The string fields' allowed values (ModelConfig.problems checks them).
CHOICES = {"activation": ("relu", "swish", "gelu"), "positions": ("interleaved", "halves")}


HEAD_DIM_MULTIPLE = 8  # onnxruntime's GroupQueryAttention (the exported decoder step) needs head sizes of 8k


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of the encoder-decoder Transformer (Vaswani et al., 2017, Table 3 names)."""

    vocab_size: int
    d_model: int = 512
    n_heads: int = 8
    d_ff: int = 2048
    n_encoder_layers: int = 6
    n_decoder_layers: int = 6
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    pre_norm: bool = False  # the paper is post-norm: LayerNorm(x + Sublayer(x))
    max_positions: int = 1024
    tie_embeddings: bool = True  # source, target and output embeddings share one matrix
    alignment_layer: int = -1  # decoder layer whose cross-attention (head mean) is returned
    # Variants of the paper found in models people import (OPUS-MT / Marian); the defaults are the paper's.
    activation: str = "relu"  # the FFN's non-linearity: relu (the paper), swish (Marian), gelu
    positions: str = "interleaved"  # sinusoid layout: sin/cos interleaved (the paper) or "halves" [sin | cos]
    scale_embedding: bool = True  # multiply embeddings by sqrt(d_model) (the paper); some imports do not
    logits_bias: bool = False  # a learned bias on the output logits (Marian's final_logits_bias)
    pad_id: int = PAD_ID
    unk_id: int = UNK_ID
    bos_id: int = BOS_ID
    eos_id: int = EOS_ID

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError("invalid model config: " + "; ".join(problems))

    def problems(self) -> list[str]:
        """Every problem with this config at once, each saying what to change."""
        out: list[str] = []
        for name in ("vocab_size", "d_model", "n_heads", "d_ff", "n_encoder_layers", "n_decoder_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                out.append(f"{name} must be a positive integer, got {value!r}")
        if not out and self.d_model % self.n_heads:
            out.append(
                f"n_heads ({self.n_heads}) must divide d_model ({self.d_model}); "
                f"try n_heads in {[h for h in range(1, 17) if self.d_model % h == 0]}"
            )
        elif not out and (self.d_model // self.n_heads) % HEAD_DIM_MULTIPLE:
            # The exported decoder step's self-attention is onnxruntime's GroupQueryAttention, which refuses
            # other head sizes (INVALID_ARGUMENT at the first step): say so before any training.
            fits = [h for h in range(1, 17) if self.d_model % h == 0 and (self.d_model // h) % HEAD_DIM_MULTIPLE == 0]
            out.append(
                f"d_model / n_heads ({self.d_model} / {self.n_heads} = {self.d_model // self.n_heads}) must be a "
                f"multiple of {HEAD_DIM_MULTIPLE} (the exported decoder's attention op needs it); "
                + (f"try n_heads in {fits}" if fits else f"choose d_model as a multiple of {HEAD_DIM_MULTIPLE}")
            )
        for name in ("dropout", "attention_dropout", "activation_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                out.append(f"{name} must be in [0, 1), got {value!r}")
        if self.max_positions < 2:
            out.append(f"max_positions must be at least 2, got {self.max_positions}")
        if isinstance(self.n_decoder_layers, int) and not (
            -self.n_decoder_layers <= self.alignment_layer < self.n_decoder_layers
        ):
            out.append(f"alignment_layer {self.alignment_layer} is outside the {self.n_decoder_layers} decoder layers")
        ids = (self.pad_id, self.unk_id, self.bos_id, self.eos_id)
        # bos_id is the decoder's start token; it may be the pad id (Marian starts decoding from pad).
        distinct = len({self.pad_id, self.unk_id, self.eos_id}) == 3 and self.bos_id not in (self.unk_id, self.eos_id)
        if not distinct or (isinstance(self.vocab_size, int) and max(ids) >= self.vocab_size):
            out.append(
                f"special ids (pad, unk, bos, eos) {ids} must be below vocab_size {self.vocab_size} and distinct "
                "(bos may equal pad)"
            )
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                out.append(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        return out

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def alignment_layer_index(self) -> int:
        return self.alignment_layer % self.n_decoder_layers

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; known keys: {sorted(known)}")
        return cls(**data)


# The paper's Table 3 (base, big) and two smaller shapes for CPU work and tests.
PRESETS: dict[str, dict[str, Any]] = {
    "base": dict(d_model=512, n_heads=8, d_ff=2048, n_encoder_layers=6, n_decoder_layers=6, dropout=0.1),
    "big": dict(d_model=1024, n_heads=16, d_ff=4096, n_encoder_layers=6, n_decoder_layers=6, dropout=0.3),
    "small": dict(d_model=256, n_heads=4, d_ff=1024, n_encoder_layers=3, n_decoder_layers=3, dropout=0.3),
    "tiny": dict(d_model=32, n_heads=2, d_ff=64, n_encoder_layers=2, n_decoder_layers=2, dropout=0.0),
}


def preset(name: str, vocab_size: int, **overrides: Any) -> ModelConfig:
    """A preset by name, with any field overridden (e.g. ``preset("small", 8000, dropout=0.1)``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return ModelConfig.from_dict({**PRESETS[name], "vocab_size": vocab_size, **overrides})
