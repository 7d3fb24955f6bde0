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


def marian_dir_with_tokenizers(tmp_path: Path) -> tuple[transformers.MarianMTModel, Path, list[str]]:
    """A tiny Marian model directory as OPUS-MT ships them: config + weights, source.spm and target.spm
    trained on a few hundred lines, and vocab.json mapping their pieces to the network's ids."""
    import random

    import sentencepiece as spm

    rng = random.Random(0)
    words = {"src": ["haus", "hund", "katze", "baum", "rot", "blau", "läuft", "schläft"],
             "tgt": ["house", "dog", "cat", "tree", "red", "blue", "runs", "sleeps"]}  # fmt: skip
    lines = {side: [" ".join(rng.choices(w, k=rng.randint(2, 7))) for _ in range(300)] for side, w in words.items()}
    out = tmp_path / "opus-mt-src-tgt"
    out.mkdir()
    for side, name in (("src", "source"), ("tgt", "target")):
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines[side]), model_prefix=str(tmp_path / name), vocab_size=24,
            model_type="unigram", minloglevel=2,
        )  # fmt: skip
        (out / f"{name}.spm").write_bytes((tmp_path / f"{name}.model").read_bytes())
    processors = [spm.SentencePieceProcessor(model_file=str(out / f"{name}.spm")) for name in ("source", "target")]
    pieces = sorted({p for sp in processors for p in sp.id_to_piece(list(range(3, sp.get_piece_size())))})
    vocab = {"</s>": 0, "<unk>": 1, **{p: i + 2 for i, p in enumerate(pieces)}}
    vocab["<pad>"] = len(vocab)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    torch.manual_seed(0)
    config = transformers.MarianConfig(
        vocab_size=len(vocab), d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        pad_token_id=vocab["<pad>"], eos_token_id=0, decoder_start_token_id=vocab["<pad>"], dropout=0.0,
    )  # fmt: skip
    model = transformers.MarianMTModel(config)
    # A few hundred steps of a copy task (target = the source's ids): outputs then follow the source and end
    # with EOS at different lengths, so decoding parity is about something (random weights repeat one token).
    tokenizer = transformers.MarianTokenizer(
        vocab=str(out / "vocab.json"), source_spm=str(out / "source.spm"), target_spm=str(out / "target.spm")
    )
    batch = tokenizer(lines["src"][:256], padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == config.pad_token_id, -100)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(150):
        rows = slice(step * 32 % 256, step * 32 % 256 + 32)
        loss = model(
            input_ids=batch["input_ids"][rows], attention_mask=batch["attention_mask"][rows], labels=labels[rows]
        ).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval().save_pretrained(out)
    return model, out, lines["src"][256:306]


def test_mt_import_tokenizes_exports_and_decodes_like_transformers(tmp_path: Path) -> None:
    from export.cli import main as mt_export
    from importers.cli import main as mt_import
    from model.decode import translate_ids
    from model.decoding import DecodingOptions
    from model.model_dir import read_model_dir
    from model.runtime import OrtModel
    from model.tokenizer import load_tokenizer

    reference, src_dir, sentences = marian_dir_with_tokenizers(tmp_path)
    out = tmp_path / "imported"
    assert mt_import(["marian", str(src_dir), str(out)]) == 0
    info = read_model_dir(out)
    assert (info.source_lang, info.target_lang) == ("src", "tgt")  # from the opus-mt-src-tgt name
    ours = load_tokenizer(info)
    theirs = transformers.MarianTokenizer(
        vocab=str(src_dir / "vocab.json"),
        source_spm=str(src_dir / "source.spm"),
        target_spm=str(src_dir / "target.spm"),
    )
    for text in [*sentences, "haus xylophon"]:  # an unknown word maps to <unk> on both sides
        assert [*ours.encode(text), info.config.eos_id] == theirs(text)["input_ids"]
    # mt-export runs its own checks (names, axes, ONNX step == torch step, beam parity) on the import.
    assert mt_export([str(out), "--quiet"]) == 0
    assert mt_import(["marian", str(src_dir), str(out)]) == 2  # refuses to overwrite without --force
    # Our ONNX graphs + numpy search against transformers' generate, greedy and beam 4, token for token.
    # Matching settings: α 0 is transformers' length_penalty 0 (raw log-probability sums); pad is banned
    # in both; 40 new tokens leave room for the EOS that most sentences of this copy model reach.
    ort_model = OrtModel.load(out, "fp32")
    cfg, ids, reached_eos = info.config, [ours.encode(text) for text in sentences], 0
    for beam in (1, 4):
        options = DecodingOptions(beam_size=beam, length_penalty=0.0, max_length=40)
        mine = translate_ids(ort_model.step_function, ids, cfg, options, batch_size=8)
        for src, tokens in zip(ids, mine, strict=True):
            source = torch.tensor([[*src, cfg.eos_id]])
            extra = {"length_penalty": 0.0, "early_stopping": False} if beam > 1 else {}
            generated = reference.generate(
                source, attention_mask=torch.ones_like(source), num_beams=beam, do_sample=False, max_new_tokens=40,
                bad_words_ids=[[cfg.pad_id]], forced_eos_token_id=None, **extra,
            )[0].tolist()  # fmt: skip
            assert generated[0] == cfg.bos_id  # decoding started from pad, as ours does
            ended = generated[-1] == cfg.eos_id
            reached_eos += ended
            assert tokens == generated[1 : -1 if ended else None], (beam, src)
    assert reached_eos >= 0.8 * 2 * len(ids)  # the parity is about real endings, not only the length cap
