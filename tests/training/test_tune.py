"""Decoding defaults tuned on validation data: the grid is scored and the best lands in model.json."""

from __future__ import annotations

import json
import shutil
from functools import partial
from pathlib import Path

from helpers import COPY_TASK, toy_pairs

from model.decode import score_translations, translate_ids
from model.decoding import DecodingOptions
from model.tokenizer import Tokenizer
from model.torch_step import TorchStepFunction
from model.weights import load_model
from training.tune import record_decoding, tune_decoding


def test_grid_is_scored_like_an_independent_decode_and_the_best_is_recorded(
    trained_model_dir: Path, tmp_path: Path
) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(trained_model_dir, model_dir)
    pairs = toy_pairs(30, "copy", seed=11, **COPY_TASK)
    sources = [s for s, _ in pairs]
    # References that drop each sentence's last word: shorter outputs score higher, so the grid has a winner.
    references = [" ".join(t.split()[:-1]) or t for _, t in pairs]
    table = tune_decoding(model_dir, sources, references, beam_sizes=(1, 3), length_penalties=(0.0, 2.0))
    assert sorted((r["beam_size"], r["length_penalty"]) for r in table) == [(1, 0.0), (1, 2.0), (3, 0.0), (3, 2.0)]
    assert [r["bleu"] for r in table] == sorted((r["bleu"] for r in table), reverse=True)

    model, info = load_model(model_dir)
    tokenizer = Tokenizer(info.tokenizer_file)
    for row in table:
        options = DecodingOptions(beam_size=row["beam_size"], length_penalty=row["length_penalty"])
        ids = translate_ids(partial(TorchStepFunction, model), tokenizer.encode_batch(sources), info.config, options)
        assert score_translations(tokenizer.decode_batch(ids), references)["bleu"] == row["bleu"]

    chosen = record_decoding(model_dir, table, "val")
    meta = json.loads((model_dir / "model.json").read_text())
    assert meta["decoding"] == chosen
    assert (chosen["beam_size"], chosen["length_penalty"]) == (table[0]["beam_size"], table[0]["length_penalty"])
    assert chosen["tuned_on"] == "val" and len(meta["decoding_tuning"]["grid"]) == 4
