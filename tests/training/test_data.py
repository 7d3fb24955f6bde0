"""Tests for training/data.py and training/spm.py: reading, errors, batching, collation, SentencePiece."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

from model.config import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from training.config import DataConfig
from training.data import (
    DataError,
    ParallelDataset,
    check_data,
    collate,
    encode_dataset,
    make_batches,
    read_parallel,
    resolve_split,
    shard,
)
from training.spm import SpmError, train_spm

PAIRS = [("ein Haus", "a house"), ("zwei Katzen\u00e4", "two cats"), ("", "empty source")]


def data_cfg(path: Path, **changes) -> DataConfig:
    return DataConfig(dir=str(path), src="src", tgt="tgt", train="train", valid="valid", **changes)


class WordIds:
    """A tokenizer stand-in: word ``w07`` is id 7 (ids are the words' numbers)."""

    def encode(self, text: str) -> list[int]:
        return [int(word[1:]) for word in text.split()]


@pytest.mark.parametrize(("gz", "fmt"), [(False, "plain"), (True, "plain"), (False, "tsv"), (True, "tsv")])
def test_plain_gz_and_tsv_read_the_same_pairs(tmp_path: Path, make_parallel, gz: bool, fmt: str) -> None:
    make_parallel(tmp_path, PAIRS, gz=gz, fmt=fmt)
    files = resolve_split(data_cfg(tmp_path), "train")
    assert isinstance(files, Path) == (fmt == "tsv")
    src, tgt = read_parallel(files)
    assert list(zip(src, tgt, strict=True)) == PAIRS


def test_carriage_return_inside_a_line_does_not_split_it(tmp_path: Path) -> None:
    (tmp_path / "train.src").write_bytes(b"a\rb\r\nc\n")
    (tmp_path / "train.tgt").write_bytes(b"x\ny\n")
    assert read_parallel(resolve_split(data_cfg(tmp_path), "train")) == (["a\rb", "c"], ["x", "y"])


def test_missing_split_names_the_files_looked_for(tmp_path: Path, make_parallel) -> None:
    with pytest.raises(DataError, match=r"looked for train\.src, train\.src\.gz, .*train\.tsv\.gz"):
        resolve_split(data_cfg(tmp_path), "train")
    (tmp_path / "train.src").write_text("a\n")
    with pytest.raises(DataError, match=r"incomplete.*found only train\.src;"):
        resolve_split(data_cfg(tmp_path), "train")
    make_parallel(tmp_path, PAIRS, fmt="tsv")
    with pytest.raises(DataError, match="incomplete"):  # half a pair is not silently replaced by the TSV
        resolve_split(data_cfg(tmp_path), "train")
    assert resolve_split(data_cfg(tmp_path, format="tsv"), "train") == tmp_path / "train.tsv"


def test_plain_and_gz_together_is_ambiguous(tmp_path: Path, make_parallel) -> None:
    make_parallel(tmp_path, PAIRS)
    make_parallel(tmp_path, PAIRS, gz=True)
    with pytest.raises(DataError, match=r"both .*train\.src and .*train\.src\.gz exist"):
        resolve_split(data_cfg(tmp_path), "train")


def test_line_count_mismatch_names_both_files_and_counts(tmp_path: Path, make_parallel) -> None:
    src_path, tgt_path = make_parallel(tmp_path, PAIRS)
    tgt_path.write_text("a house\ntwo cats\n")
    with pytest.raises(DataError) as caught:
        read_parallel((src_path, tgt_path))
    assert f"{src_path} has 3 lines but {tgt_path} has 2" in str(caught.value)


def test_empty_file_is_an_error(tmp_path: Path) -> None:
    empty = tmp_path / "train.src.gz"
    empty.write_bytes(gzip.compress(b""))
    (tmp_path / "train.tgt").write_text("x\n")
    with pytest.raises(DataError, match=f"{empty} is empty"):
        read_parallel(resolve_split(data_cfg(tmp_path), "train"))


def test_tsv_line_without_one_tab_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "train.tsv"
    path.write_text("a\tb\nc\td\te\n")
    with pytest.raises(DataError, match=f"{path} line 2 has 2 tabs"):
        read_parallel(path)


def test_not_utf8(tmp_path: Path) -> None:
    (tmp_path / "train.src").write_bytes(b"caf\xe9\n")
    (tmp_path / "train.tgt").write_text("x\n")
    with pytest.raises(DataError, match="is not UTF-8"):
        read_parallel(resolve_split(data_cfg(tmp_path), "train"))


def test_check_data_reports_both_splits(tmp_path: Path, make_parallel) -> None:
    make_parallel(tmp_path, PAIRS, split="train")
    with pytest.raises(DataError, match=r"data\.valid \('valid'\): split 'valid' not found"):
        check_data(data_cfg(tmp_path))
    make_parallel(tmp_path, PAIRS[:2], split="valid", gz=True)
    train, valid = check_data(data_cfg(tmp_path))
    assert len(train[0]) == 3 and valid == (["ein Haus", "zwei Katzen\u00e4"], ["a house", "two cats"])


def test_encode_filters_train_pairs_only() -> None:
    src = ["w1 w2", "", "w1 w2 w3 w4 w5", "w1", "w4 w5 w6"]
    tgt = ["w3", "w4", "w5", "w1 w2 w3 w4", "w7 w8"]
    train = encode_dataset(WordIds(), src, tgt, max_len=4, max_len_ratio=3.0)
    assert train.line_ids.tolist() == [0, 4]  # empty, too long, ratio 4 > 3
    assert [x.tolist() for x in train.src] == [[1, 2], [4, 5, 6]]
    assert train.src_lens.tolist() == [2, 3] and train.tgt_lens.tolist() == [1, 2]
    valid = encode_dataset(WordIds(), src, tgt, max_len=4, max_len_ratio=3.0, filter_long=False)
    assert len(valid) == 5 and valid.src[1].dtype == np.int32


def budget_width(src_lens: np.ndarray, tgt_lens: np.ndarray, batch: np.ndarray) -> int:
    return len(batch) * int(max(src_lens[batch].max(), tgt_lens[batch].max()) + 1)


def test_batches_respect_budget_and_cover_everything_once() -> None:
    rng = np.random.default_rng(0)
    src_lens, tgt_lens = rng.integers(1, 40, 500), rng.integers(1, 40, 500)
    src_lens[7] = 300  # over the budget on its own: a batch of one
    batches = make_batches(src_lens, tgt_lens, batch_tokens=256, seed=1, epoch=0)
    assert sorted(np.concatenate(batches).tolist()) == list(range(500))
    assert [b.tolist() for b in batches if 7 in b] == [[7]]
    assert all(budget_width(src_lens, tgt_lens, b) <= 256 for b in batches if len(b) > 1)
    full = sum(budget_width(src_lens, tgt_lens, b) for b in batches) / (256 * len(batches))
    assert full > 0.8  # length bucketing keeps batches nearly full


def test_batches_are_deterministic_per_seed_and_epoch() -> None:
    rng = np.random.default_rng(0)
    src_lens, tgt_lens = rng.integers(1, 20, 300), rng.integers(1, 20, 300)

    def run(seed: int, epoch: int) -> list[list[int]]:
        return [b.tolist() for b in make_batches(src_lens, tgt_lens, 128, seed, epoch)]

    assert run(1, 3) == run(1, 3)
    assert run(1, 3) != run(1, 4)
    assert run(1, 3) != run(2, 3)
    assert make_batches(np.array([], int), np.array([], int), 128, 1, 0) == []


@pytest.mark.parametrize("n_batches", [1, 7, 8, 9])
def test_shard_gives_every_rank_the_same_count(n_batches: int) -> None:
    batches = [np.array([i]) for i in range(n_batches)]
    shards = [shard(batches, rank, 4) for rank in range(4)]
    assert len({len(s) for s in shards}) == 1
    seen = {int(b[0]) for s in shards for b in s}
    assert seen == set(range(n_batches))
    assert shard(batches, 0, 1) == batches
    with pytest.raises(ValueError, match="outside world size"):
        shard(batches, 4, 4)


def test_collate_places_specials_and_masks_exactly() -> None:
    ds = ParallelDataset(
        src=[np.array([5, 6, 7], np.int32), np.array([8], np.int32)],
        tgt=[np.array([9], np.int32), np.array([10, 11], np.int32)],
        line_ids=np.arange(2),
    )
    batch = collate(ds, np.array([0, 1]))
    assert batch.src.tolist() == [[5, 6, 7, EOS_ID], [8, EOS_ID, PAD_ID, PAD_ID]]
    assert batch.src_pad_mask.tolist() == [[False] * 4, [False, False, True, True]]
    assert batch.tgt_in.tolist() == [[BOS_ID, 9, PAD_ID], [BOS_ID, 10, 11]]
    assert batch.tgt_out.tolist() == [[9, EOS_ID, PAD_ID], [10, 11, EOS_ID]]
    assert batch.tgt_pad_mask.tolist() == [[False, False, True], [False, False, False]]
    assert batch.n_tgt_tokens == 5
    assert batch.src.dtype == batch.tgt_in.dtype == batch.tgt_out.dtype == torch.int64
    assert batch.to("cpu").src.equal(batch.src)


def test_spm_trains_and_round_trips_with_the_special_ids(tmp_path: Path, make_parallel, toy_pairs) -> None:
    pairs = [*toy_pairs(100, "copy", seed=0), ("Grüße aus Köln", "greetings from Cologne")]
    src_file, _ = make_parallel(tmp_path, pairs, gz=True)
    model_path = train_spm([src_file, *(t for _, t in pairs)], tmp_path / "spm", vocab_size=60)
    assert model_path == tmp_path / "spm.model" and (tmp_path / "spm.vocab").is_file()
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    specials = [sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()]
    assert specials == [PAD_ID, UNK_ID, BOS_ID, EOS_ID]
    for text in ("w01 w02 w13", "Grüße aus Köln"):
        ids = sp.encode(text)
        assert min(ids) > EOS_ID and sp.decode(ids) == text
    again = train_spm([src_file, *(t for _, t in pairs)], tmp_path / "again", vocab_size=60)
    assert again.read_bytes() == model_path.read_bytes()  # deterministic, no temp paths inside


def test_spm_vocab_too_small_says_what_to_change(tmp_path: Path) -> None:
    with pytest.raises(SpmError, match=r"raise tokenizer\.vocab_size \(now 6\)"):
        train_spm(["abcdefghijklmnop"], tmp_path / "spm", vocab_size=6)
    assert not list(tmp_path.glob("spm*"))
