"""Subword regularisation: per-epoch samples that keep the text, vary by epoch and repeat exactly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import toy_pairs

from model.tokenizer import Tokenizer
from training.config import ConfigError, TrainConfig
from training.data import encode_dataset
from training.spm import train_spm
from training.subword import sample_dataset

WORDS = [
    "Ein",
    "Mann",
    "fährt",
    "mit",
    "dem",
    "Fahrrad",
    "über",
    "eine",
    "Brücke",
    ".",
    "Zwei",
    "Kinder",
    "spielen",
    "im",
    "Schnee",
    "auf",
    "der",
    "Wiese",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    lines = [" ".join(WORDS[i % len(WORDS) :] + WORDS[: i % len(WORDS)]) for i in range(200)]
    model = train_spm(lines, tmp_path_factory.mktemp("spm") / "spm", vocab_size=60)
    return Tokenizer(model)


def corpus() -> tuple[list[str], list[str]]:
    pairs = toy_pairs(40, "copy", seed=3)
    src = [" ".join(WORDS[int(w[1:]) % len(WORDS)] for w in s.split()) for s, _ in pairs]
    return src, src[::-1]


def test_sample_keeps_the_text_and_repeats_per_seed_and_epoch(tokenizer: Tokenizer) -> None:
    texts = corpus()
    best = encode_dataset(tokenizer, *texts, max_len=100)

    def sample(seed: int, epoch: int):
        return sample_dataset(tokenizer.sp, texts, best, 0.3, 16, 100, seed, epoch)

    first = sample(1, 0)
    assert [x.tolist() for x in first.src] == [x.tolist() for x in sample(1, 0).src]
    assert [y.tolist() for y in first.tgt] == [y.tolist() for y in sample(1, 0).tgt]
    assert [x.tolist() for x in first.src] != [x.tolist() for x in sample(1, 1).src]
    assert [x.tolist() for x in first.src] != [x.tolist() for x in sample(2, 0).src]
    assert [x.tolist() for x in first.src] != [x.tolist() for x in best.src]
    # Another segmentation of the same sentence: decoding gives the text back, line by line.
    for side, dataset_side in ((0, first.src), (1, first.tgt)):
        assert [tokenizer.decode(x.tolist()) for x in dataset_side] == [
            texts[side][line] for line in first.line_ids.tolist()
        ]
    assert first.line_ids.tolist() == best.line_ids.tolist()


def test_sample_is_cut_to_max_len(tokenizer: Tokenizer) -> None:
    texts = corpus()
    best = encode_dataset(tokenizer, *texts, max_len=100)
    short = sample_dataset(tokenizer.sp, texts, best, 0.01, 64, 4, 1, 0)
    assert max(short.src_lens.max(), short.tgt_lens.max()) == 4


CHILD = """
import json, sys
from model.tokenizer import Tokenizer
from training.data import encode_dataset
from training.subword import sample_dataset
tokenizer, texts = Tokenizer(sys.argv[1]), json.loads(sys.argv[2])
sample = sample_dataset(tokenizer.sp, texts, encode_dataset(tokenizer, *texts, max_len=100), 0.3, 16, 100, 7, 3)
print(json.dumps([x.tolist() for x in sample.src]))
"""


def test_sample_is_the_same_in_another_process(tokenizer: Tokenizer) -> None:
    """Exact resume needs an epoch's sample to repeat in a new process (SentencePiece's own sampler does
    not: its draws differ between processes for the same seed)."""
    texts = corpus()
    here = sample_dataset(tokenizer.sp, texts, encode_dataset(tokenizer, *texts, max_len=100), 0.3, 16, 100, 7, 3)
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(tokenizer.path), json.dumps(texts)], capture_output=True, text=True
    )
    assert child.returncode == 0, child.stderr
    assert json.loads(child.stdout) == [x.tolist() for x in here.src]


@pytest.mark.parametrize("model_type", ["char", "bpe"])
def test_config_refuses_sampling_it_cannot_do(tmp_path: Path, model_type: str) -> None:
    raw = {
        "output_dir": str(tmp_path / "out"),
        "data": {"dir": str(tmp_path)},
        "tokenizer": {"model_type": model_type, "sampling_alpha": 0.1},
    }
    with pytest.raises(ConfigError) as error:
        TrainConfig.from_dict(raw)
    assert "tokenizer.sampling_alpha needs model_type unigram" in str(error.value)
