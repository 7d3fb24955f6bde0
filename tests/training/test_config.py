"""Tests for training/config.py: every bad config is reported with what to change, good ones round-trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.config import ConfigError, OptimConfig, TrainConfig, load_config

RECIPE = Path(__file__).resolve().parents[2] / "training" / "configs" / "multi30k_de_en.yaml"


@pytest.fixture
def base_sets(tmp_path: Path) -> list[str]:
    return [f"data.dir={tmp_path}", f"output_dir={tmp_path / 'out'}"]


@pytest.mark.parametrize(
    ("sets", "phrase"),
    [
        (["model.n_heads=3"], "n_heads (3) must divide d_model (256)"),
        (["data.srcc=de"], "unknown key 'data.srcc'; did you mean 'data.src'?"),
        (["max_steps=5"], "it belongs under 'train.max_steps'"),
        (["train.max_steps"], "--set 'train.max_steps' is not key=value"),
        (["train.max_steps=-5"], "train.max_steps must be positive, got -5"),
        (["train.max_steps=ten"], "train.max_steps must be an integer, got str 'ten'"),
        (["model.preset=huge"], "model.preset 'huge' is unknown; choose one of ['base', 'big', 'small', 'tiny']"),
        (["train.amp=fp32"], "train.amp must be one of ['auto', 'none', 'bf16', 'fp16'], got 'fp32'"),
        (["data.tgt=de"], "data.src and data.tgt are both 'de'"),
        (["data.dir=/no/such/dir"], "data.dir '/no/such/dir' is not a directory"),
        (["data.format=csv"], "data.format must be one of ['auto', 'plain', 'tsv']"),
        (["train.device=tpu"], "train.device must be one of ['auto', 'cpu', 'cuda']"),
        (["model.vocab_size=100"], "model.vocab_size cannot be set here"),
        (["model.dropout=1.5"], "dropout must be in [0, 1)"),
        (["train.label_smoothing=1"], "train.label_smoothing must be in [0, 1)"),
        (["train.average_last=9"], "train.average_last (9) exceeds train.keep_last (5)"),
        (["train.cooldown=1.5"], "train.cooldown must be in [0, 1)"),
        (["tokenizer.model=/no/spm.model"], "tokenizer.model '/no/spm.model' does not exist"),
        (["data=3"], "data must be a mapping"),
        (["seed=1", "seed.x=1"], "seed is not a section"),
        (["train.max_steps=true"], "train.max_steps must be an integer, got bool True"),
        (["train.keep_last=2.5"], "train.keep_last must be an integer, got float 2.5"),
        (["model.pre_norm=maybe"], "model.pre_norm must be true/false, got str 'maybe'"),
        (["train.lr_scale=.nan"], "train.lr_scale must be a finite number"),
        (["data.max_len_ratio=0.5"], "data.max_len_ratio must be 0 (off) or at least 1, got 0.5"),
    ],
)
def test_bad_config_says_what_to_change(base_sets: list[str], sets: list[str], phrase: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, [*base_sets, *sets])
    assert phrase in str(caught.value)
    assert len(caught.value.problems) == 1, caught.value.problems


def test_required_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None)
    assert "output_dir is required" in str(caught.value)
    assert "data.dir is required" in str(caught.value)


def test_every_problem_is_reported_at_once(base_sets: list[str]) -> None:
    sets = ["train.max_steps=0", "train.amp=fp32", "data.srcc=x", "model.n_heads=3", "bad", "data.dir=/nope"]
    with pytest.raises(ConfigError) as caught:
        load_config(None, [*base_sets, *sets])
    problems = caught.value.problems
    assert len(problems) == 6, problems
    assert "(6 problems)" in str(caught.value)


def test_set_values_are_parsed_as_yaml(base_sets: list[str]) -> None:
    cfg = load_config(
        None,
        [
            *base_sets,
            "train.max_steps=20",
            "model.dropout=0.1",
            "train.lr_scale=1e-3",  # PyYAML reads this as a string; float fields accept it
            "train.clip_norm=1",  # an int where a float is expected
            "model.pre_norm=true",
            "tokenizer.model=",  # empty = null
            "data.dir=" + base_sets[0].split("=", 1)[1],
        ],
    )
    assert cfg.train.max_steps == 20 and isinstance(cfg.train.max_steps, int)
    assert cfg.model.overrides == {"dropout": 0.1, "pre_norm": True}
    assert cfg.train.lr_scale == 1e-3 and cfg.train.clip_norm == 1.0
    assert isinstance(cfg.train.clip_norm, float)
    assert cfg.tokenizer.model is None
    model = cfg.model.build(vocab_size=100)
    assert (model.d_model, model.dropout, model.pre_norm, model.vocab_size) == (256, 0.1, True, 100)


def test_set_overrides_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(f"output_dir: out\ndata:\n  dir: {tmp_path}\ntrain:\n  max_steps: 7\n")
    assert load_config(path).train.max_steps == 7
    assert load_config(path, ["train.max_steps=9"]).train.max_steps == 9


def test_round_trip_through_json(base_sets: list[str]) -> None:
    cfg = load_config(None, [*base_sets, "model.preset=tiny", "model.dropout=0.2", "eval.beam_size=5"])
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["model"] == {"preset": "tiny", "dropout": 0.2}
    assert data["train"] == {f: getattr(OptimConfig(), f) for f in data["train"]}
    assert TrainConfig.from_dict(data) == cfg


def test_from_dict_validates_without_touching_the_disk() -> None:
    data = {"output_dir": "x", "data": {"dir": "/not/here"}}
    assert TrainConfig.from_dict(data).data.dir == "/not/here"
    with pytest.raises(ConfigError, match=r"train\.warmup_steps must be positive"):
        TrainConfig.from_dict({**data, "train": {"warmup_steps": 0}})


def test_bad_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(tmp_path / "missing.yaml")


def test_multi30k_recipe_loads(tmp_path: Path) -> None:
    cfg = load_config(RECIPE, [f"data.dir={tmp_path}"])
    assert (cfg.data.src, cfg.data.tgt, cfg.tokenizer.vocab_size) == ("de", "en", 4000)
    assert (cfg.tokenizer.sampling_alpha, cfg.tokenizer.sampling_nbest) == (0.1, 64)
    model = cfg.model.build(cfg.tokenizer.vocab_size)
    assert (model.d_model, model.n_heads, model.d_ff, model.n_encoder_layers, model.dropout) == (256, 4, 1024, 3, 0.3)
    assert (cfg.eval.beam_size, cfg.eval.length_penalty, cfg.train.average_last) == (4, 0.6, 10)
    # Training with the shipped recipe as it is must never overwrite the bundled model.
    assert Path(cfg.output_dir).resolve() != (Path(RECIPE).parents[2] / "models" / "multi30k-de-en").resolve()


def test_toy_overrides_load(toy_data_dir: Path, tmp_path: Path, toy_overrides) -> None:
    cfg = load_config(None, toy_overrides(toy_data_dir, tmp_path / "out"))
    assert cfg.model.build(64).d_model == 32
