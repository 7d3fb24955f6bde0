"""Marian (OPUS-MT) models in the Hugging Face layout → our ``ModelConfig`` and weights.

Follows CTranslate2's converter habit: the config is checked for everything we cannot represent (each
problem names its key), the weights are moved by tiny per-layer functions, and every missing or unused
weight is reported at once. Reads local files only (``config.json``, ``model.safetensors`` or
``pytorch_model.bin``); the tokenizer side (``source.spm``, ``target.spm``, ``vocab.json``) is separate.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from model.config import ModelConfig
from model.transformer import sinusoidal_table

ACTIVATIONS = {"swish": "swish", "silu": "swish", "gelu": "gelu", "relu": "relu"}
# Copies of the one shared embedding matrix; a checkpoint saved with tied weights may hold only one of them.
EMBEDDINGS = ("model.shared.weight", "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight")


class MarianImportError(ValueError):
    """The model cannot be imported; ``problems`` lists every reason, each naming its key."""

    def __init__(self, problems: list[str], source: Path) -> None:
        self.problems = problems
        super().__init__(f"cannot import {source}:\n" + "\n".join(f"  - {p}" for p in problems))


def read_config(src_dir: Path, unk_id: int = 1) -> ModelConfig:
    """Our config for the Marian model in ``src_dir`` (``unk_id`` comes from its ``vocab.json``)."""
    path = Path(src_dir) / "config.json"
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise MarianImportError([f"{path}: {error}"], Path(src_dir)) from error
    problems = _unsupported(hf)
    if problems:
        raise MarianImportError(problems, Path(src_dir))
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        d_model=hf["d_model"],
        n_heads=hf["encoder_attention_heads"],
        d_ff=hf["encoder_ffn_dim"],
        n_encoder_layers=hf["encoder_layers"],
        n_decoder_layers=hf["decoder_layers"],
        dropout=0.0,
        max_positions=hf.get("max_position_embeddings", 512),
        tie_embeddings=True,
        activation=ACTIVATIONS[hf.get("activation_function", "swish")],
        positions="halves",
        scale_embedding=bool(hf.get("scale_embedding", False)),
        logits_bias=True,
        pad_id=hf["pad_token_id"],
        unk_id=unk_id,
        bos_id=hf.get("decoder_start_token_id", hf["pad_token_id"]),  # Marian starts decoding from pad
        eos_id=hf["eos_token_id"],
    )


def _unsupported(hf: dict[str, Any]) -> list[str]:
    """Every setting of a Marian config.json that our network cannot reproduce."""
    out = []
    if hf.get("model_type", "marian") != "marian":
        out.append(f"model_type is {hf.get('model_type')!r}: only 'marian' models are imported")
    for ours, (enc, dec) in {"n_heads": ("encoder_attention_heads", "decoder_attention_heads"),
                             "d_ff": ("encoder_ffn_dim", "decoder_ffn_dim")}.items():  # fmt: skip
        if hf.get(enc) != hf.get(dec):
            out.append(f"{enc} ({hf.get(enc)}) != {dec} ({hf.get(dec)}): our {ours} is one value for both stacks")
    if hf.get("activation_function", "swish") not in ACTIVATIONS:
        out.append(f"activation_function {hf.get('activation_function')!r} is not one of {sorted(ACTIVATIONS)}")
    if not hf.get("share_encoder_decoder_embeddings", True):
        out.append("share_encoder_decoder_embeddings is false: separate source/target vocabularies are not supported")
    if hf.get("normalize_before", False):
        out.append("normalize_before is true: pre-norm Marian models are not supported")
    for key in ("vocab_size", "d_model", "pad_token_id", "eos_token_id", "encoder_layers", "decoder_layers"):
        if key not in hf:
            out.append(f"{key} is missing")
    return out


def read_weights(src_dir: Path) -> dict[str, Tensor]:
    """The checkpoint's tensors: ``model.safetensors`` if present, else ``pytorch_model.bin`` (no pickled code)."""
    src_dir = Path(src_dir)
    if (src_dir / "model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(src_dir / "model.safetensors")
    if (src_dir / "pytorch_model.bin").is_file():
        return torch.load(src_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise MarianImportError(["no model.safetensors or pytorch_model.bin"], src_dir)


def convert_weights(hf: dict[str, Tensor], cfg: ModelConfig, source: Path) -> dict[str, Tensor]:
    """Our state dict from the Marian one; every missing, mismatched or unused tensor reported at once."""
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    problems: list[str] = []

    def take(key: str) -> Tensor | None:
        if key not in hf:
            problems.append(f"missing weight {key}")
            return None
        used.add(key)
        return hf[key].float()

    def set_linear(ours: str, theirs: str) -> None:
        for part in ("weight", "bias"):
            tensor = take(f"{theirs}.{part}")
            if tensor is not None:
                out[f"{ours}.{part}"] = tensor

    set_layer_norm = set_linear  # the same two tensors, weight and bias

    def set_attention(ours: str, theirs: str) -> None:
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            set_linear(f"{ours}.{proj}", f"{theirs}.{proj}")

    for i in range(cfg.n_encoder_layers):
        ours, theirs = f"encoder_layers.{i}", f"model.encoder.layers.{i}"
        set_attention(f"{ours}.self_attn", f"{theirs}.self_attn")
        set_layer_norm(f"{ours}.self_attn_sub.norm", f"{theirs}.self_attn_layer_norm")
        set_linear(f"{ours}.ffn.w1", f"{theirs}.fc1")
        set_linear(f"{ours}.ffn.w2", f"{theirs}.fc2")
        set_layer_norm(f"{ours}.ffn_sub.norm", f"{theirs}.final_layer_norm")
    for i in range(cfg.n_decoder_layers):
        ours, theirs = f"decoder_layers.{i}", f"model.decoder.layers.{i}"
        set_attention(f"{ours}.self_attn", f"{theirs}.self_attn")
        set_layer_norm(f"{ours}.self_attn_sub.norm", f"{theirs}.self_attn_layer_norm")
        set_attention(f"{ours}.cross_attn", f"{theirs}.encoder_attn")
        set_layer_norm(f"{ours}.cross_attn_sub.norm", f"{theirs}.encoder_attn_layer_norm")
        set_linear(f"{ours}.ffn.w1", f"{theirs}.fc1")
        set_linear(f"{ours}.ffn.w2", f"{theirs}.fc2")
        set_layer_norm(f"{ours}.ffn_sub.norm", f"{theirs}.final_layer_norm")
    _set_embedding(hf, out, used, problems)
    bias = take("final_logits_bias")
    if bias is not None:
        out["logits_bias"] = bias.reshape(-1)  # (1, V) → (V,)
    _check_positions(hf, cfg, used, problems)
    unused = sorted(set(hf) - used)
    if unused:
        problems.append(f"unused weights (the network has no place for them): {', '.join(unused)}")
    if problems:
        raise MarianImportError(problems, source)
    return out


def _set_embedding(hf: dict[str, Tensor], out: dict[str, Tensor], used: set[str], problems: list[str]) -> None:
    """One matrix for source, target and output: every copy present must be the same."""
    present = [key for key in (*EMBEDDINGS, "lm_head.weight") if key in hf]
    if not present:
        problems.append(f"missing weight: none of {', '.join((*EMBEDDINGS, 'lm_head.weight'))}")
        return
    shared = hf[present[0]].float()
    differ = [key for key in present[1:] if not torch.equal(hf[key].float(), shared)]
    if differ:
        problems.append(f"{', '.join(differ)} differ from {present[0]}: only tied embeddings are supported")
    used.update(present)
    out["embed.weight"] = shared


def _check_positions(hf: dict[str, Tensor], cfg: ModelConfig, used: set[str], problems: list[str]) -> None:
    """Stored position tables (some versions save them) must be the sinusoids we compute."""
    expected = sinusoidal_table(cfg.max_positions, cfg.d_model, cfg.positions)
    for key in ("model.encoder.embed_positions.weight", "model.decoder.embed_positions.weight"):
        if key in hf:
            used.add(key)
            table = hf[key].float()
            if table.shape != expected.shape or (table - expected).abs().max() > 1e-4:
                problems.append(f"{key} is not the sinusoid table Marian computes: learned positions are not supported")


def import_network(src_dir: Path, unk_id: int = 1) -> tuple[ModelConfig, dict[str, Tensor]]:
    """Config and state dict of the Marian model in ``src_dir``, checked whole."""
    cfg = read_config(src_dir, unk_id)
    return cfg, convert_weights(read_weights(src_dir), cfg, Path(src_dir))
