"""Marian import: a tiny random MarianMTModel saved by transformers gives the same logits in our network."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from importers.marian import MarianImportError, import_network
from model.transformer import Transformer

transformers = pytest.importorskip("transformers", reason="transformers (dev extra) builds the reference model")

VOCAB, PAD = 60, 59


def tiny_marian(tmp_path: Path, **changes: object) -> tuple[transformers.MarianMTModel, Path]:
    """A random 2+2-layer Marian model with a non-zero logits bias, saved as transformers saves it."""
    torch.manual_seed(0)
    settings = dict(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        pad_token_id=PAD, eos_token_id=0, decoder_start_token_id=PAD, activation_function="swish",
        scale_embedding=True, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
    )  # fmt: skip
    model = transformers.MarianMTModel(transformers.MarianConfig(**{**settings, **changes})).eval()
    with torch.no_grad():
        model.final_logits_bias.normal_()
    model.save_pretrained(tmp_path / "marian")
    return model, tmp_path / "marian"


def random_batch(n: int, s: int, t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sources with EOS and right padding of different lengths, and decoder inputs starting from pad."""
    gen = torch.Generator().manual_seed(1)
    src = torch.randint(2, PAD, (n, s), generator=gen)
    lengths = torch.randint(2, s + 1, (n,), generator=gen)
    pad_mask = torch.arange(s)[None, :] >= lengths[:, None]  # (N, S), True at padding
    src[torch.arange(n), lengths - 1] = 0  # EOS ends each source
    src[pad_mask] = PAD
    tgt_in = torch.randint(2, PAD, (n, t), generator=gen)
    tgt_in[:, 0] = PAD  # the decoder starts from pad
    return src, pad_mask, tgt_in


def test_logits_equal_transformers(tmp_path: Path) -> None:
    reference, src_dir = tiny_marian(tmp_path)
    cfg, state = import_network(src_dir)
    assert (cfg.activation, cfg.positions, cfg.logits_bias, cfg.bos_id, cfg.pad_id) == (
        "swish",
        "halves",
        True,
        PAD,
        PAD,
    )
    ours = Transformer(cfg).eval()
    ours.load_state_dict(state)
    src, pad_mask, tgt_in = random_batch(n=6, s=11, t=9)
    with torch.no_grad():
        theirs = reference(input_ids=src, attention_mask=(~pad_mask).long(), decoder_input_ids=tgt_in).logits
        mine = ours(src, pad_mask, tgt_in)
    assert mine.shape == theirs.shape == (6, 9, VOCAB)
    assert (mine - theirs).abs().max() <= 1e-4


def test_stepwise_decoding_of_the_import_equals_its_full_pass(tmp_path: Path) -> None:
    _, src_dir = tiny_marian(tmp_path, activation_function="gelu", scale_embedding=False)
    cfg, state = import_network(src_dir)
    ours = Transformer(cfg).eval()
    ours.load_state_dict(state)
    src, pad_mask, tgt_in = random_batch(n=3, s=7, t=5)
    with torch.no_grad():
        full = torch.log_softmax(ours(src, pad_mask, tgt_in), dim=-1)
        memory, cache = ours.encode(src, pad_mask), None
        for t in range(tgt_in.shape[1]):
            step, cache, _ = ours.decode_step(tgt_in[:, t : t + 1], torch.tensor([t]), memory, pad_mask, cache)
            assert (step[:, 0] - full[:, t]).abs().max() <= 1e-5


def test_what_cannot_be_represented_is_named_all_at_once(tmp_path: Path) -> None:
    _, src_dir = tiny_marian(tmp_path)
    config = json.loads((src_dir / "config.json").read_text())
    config.update(decoder_attention_heads=2, activation_function="tanh", share_encoder_decoder_embeddings=False)
    (src_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(MarianImportError) as caught:
        import_network(src_dir)
    text = str(caught.value)
    assert len(caught.value.problems) == 3
    for key in ("decoder_attention_heads", "activation_function", "share_encoder_decoder_embeddings"):
        assert key in text


def test_missing_and_unused_weights_are_all_reported(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    _, src_dir = tiny_marian(tmp_path)
    tensors = load_file(src_dir / "model.safetensors")
    del tensors["model.decoder.layers.1.fc2.bias"], tensors["final_logits_bias"]
    tensors["model.decoder.layer_norm.weight"] = torch.ones(32)
    save_file(tensors, src_dir / "model.safetensors")
    with pytest.raises(MarianImportError) as caught:
        import_network(src_dir)
    text = str(caught.value)
    assert "missing weight model.decoder.layers.1.fc2.bias" in text and "missing weight final_logits_bias" in text
    assert "unused weights (the network has no place for them): model.decoder.layer_norm.weight" in text


def test_config_fields_for_imports_are_validated() -> None:
    from model.config import preset

    with pytest.raises(ValueError) as caught:
        preset("tiny", 50, activation="tanh", positions="rotary")
    assert "activation must be one of ['relu', 'swish', 'gelu']" in str(caught.value)
    assert "positions must be one of ['interleaved', 'halves']" in str(caught.value)
    assert preset("tiny", 50, pad_id=49, bos_id=49, eos_id=0, unk_id=1).bos_id == 49  # Marian: start from pad
    with pytest.raises(ValueError, match="bos may equal pad"):
        preset("tiny", 50, bos_id=3)  # the EOS id (3) cannot start decoding
