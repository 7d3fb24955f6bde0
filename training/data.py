"""Parallel text for training: find and read the files, encode and filter pairs, batch them by tokens.

Conventions, stated once:
- Stored examples hold subword ids only, without special tokens. ``collate`` adds them: the source gets
  EOS appended (``x </s>``), the decoder input is ``<s> y`` and the decoder target ``y </s>``.
- Lengths in the token budget count those added tokens (``len + 1`` on each side).
- Masks are ``True`` at padding.
"""

from __future__ import annotations

import gzip
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from model.config import BOS_ID, EOS_ID, PAD_ID
from training.config import DataConfig

logger = logging.getLogger(__name__)

# One split on disk: two aligned files (source, target) or one TSV file of "src<TAB>tgt" lines.
SplitFiles = tuple[Path, Path] | Path
# One split in memory: (source sentences, target sentences), aligned.
Texts = tuple[list[str], list[str]]


class DataError(ValueError):
    """The data cannot be used; the message names the files and what is wrong with them."""


class Encoder(Protocol):
    def encode(self, text: str) -> list[int]: ...


def resolve_split(cfg: DataConfig, split: str) -> SplitFiles:
    """The files of split prefix ``split`` (e.g. ``cfg.train``, ``cfg.valid`` or ``"test_2016_flickr"``).

    Looks for ``{dir}/{split}.{src}`` and ``.{tgt}`` (each plain or ``.gz``), else ``{dir}/{split}.tsv``
    (or ``.tsv.gz``), as ``cfg.format`` allows (``auto`` prefers the aligned pair).
    """
    tried: list[Path] = []
    if cfg.format in ("auto", "plain"):
        src, tgt = (_one_of(cfg.path / f"{split}.{lang}", tried) for lang in (cfg.src, cfg.tgt))
        if src and tgt:
            return src, tgt
        if src or tgt:  # half a pair is a mistake, not a cue to try TSV
            raise DataError(
                f"split {split!r} is incomplete in {cfg.path}: looked for {_names(tried)} and found "
                f"only {(src or tgt).name}; both sides must exist"
            )
    if cfg.format in ("auto", "tsv"):
        tsv = _one_of(cfg.path / f"{split}.tsv", tried)
        if tsv:
            return tsv
    raise DataError(
        f"split {split!r} not found in {cfg.path}: looked for {_names(tried)}; "
        "check data.dir, the split names (data.train, data.valid) and data.src/data.tgt"
    )


def _one_of(path: Path, tried: list[Path]) -> Path | None:
    """``path`` or ``path.gz``, whichever exists; both existing is ambiguous."""
    gz = path.with_name(path.name + ".gz")
    tried += [path, gz]
    if path.is_file() and gz.is_file():
        raise DataError(f"both {path} and {gz} exist; remove one so it is clear which to read")
    return path if path.is_file() else gz if gz.is_file() else None


def _names(paths: Sequence[Path]) -> str:
    return ", ".join(p.name for p in paths)


def read_parallel(files: SplitFiles) -> Texts:
    """Read one split as (source sentences, target sentences); UTF-8, plain or ``.gz`` by suffix.

    Raises ``DataError`` for empty files, line counts that differ, or TSV lines without exactly one tab.
    """
    if isinstance(files, Path):
        lines = _read_lines(files)
        src, tgt = [], []
        for number, line in enumerate(lines, start=1):
            tabs = line.count("\t")
            if tabs != 1:
                raise DataError(f"{files} line {number} has {tabs} tabs; each line must be src<TAB>tgt")
            left, right = line.split("\t")
            src.append(left)
            tgt.append(right)
        return src, tgt
    src_path, tgt_path = files
    src, tgt = _read_lines(src_path), _read_lines(tgt_path)
    if len(src) != len(tgt):
        raise DataError(
            f"line counts differ: {src_path} has {len(src)} lines but {tgt_path} has {len(tgt)}; "
            "the files must be aligned line by line"
        )
    return src, tgt


def _read_lines(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        # newline="\n": a stray "\r" inside a sentence must not split it and shift the alignment.
        with opener(path, "rt", encoding="utf-8", newline="\n") as handle:
            lines = [line.rstrip("\r\n") for line in handle]
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not UTF-8 ({error.reason} at byte {error.start}); re-encode it") from error
    except (OSError, EOFError) as error:
        raise DataError(f"cannot read {path}: {error}") from error
    if not lines:
        raise DataError(f"{path} is empty")
    return lines


def read_split(cfg: DataConfig, split: str) -> Texts:
    """``read_parallel(resolve_split(cfg, split))``."""
    return read_parallel(resolve_split(cfg, split))


def check_data(cfg: DataConfig) -> tuple[Texts, Texts]:
    """Read the train and valid splits, reporting every problem of both together (``DataError``).

    Fast (Multi30k: well under a second); call it before anything expensive. Returns
    ``((train_src, train_tgt), (valid_src, valid_tgt))`` so nothing needs reading twice.
    """
    splits: dict[str, Texts] = {}
    problems: list[str] = []
    for role, split in (("train", cfg.train), ("valid", cfg.valid)):
        try:
            splits[role] = read_split(cfg, split)
        except DataError as error:
            problems.append(f"data.{role} ({split!r}): {error}")
    if problems:
        raise DataError("the data is not usable:\n" + "\n".join(f"  - {p}" for p in problems))
    train, valid = splits["train"], splits["valid"]
    logger.info("data: %d train pairs, %d valid pairs in %s", len(train[0]), len(valid[0]), cfg.path)
    return train, valid


@dataclass(frozen=True)
class ParallelDataset:
    """Encoded pairs (int32 subword ids, no special tokens) and, per pair, its line in the source file."""

    src: list[np.ndarray]
    tgt: list[np.ndarray]
    line_ids: np.ndarray

    def __len__(self) -> int:
        return len(self.src)

    @cached_property
    def src_lens(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.src), dtype=np.int64, count=len(self.src))

    @cached_property
    def tgt_lens(self) -> np.ndarray:
        return np.fromiter((len(y) for y in self.tgt), dtype=np.int64, count=len(self.tgt))


def encode_dataset(
    tokenizer: Encoder,
    src_texts: Sequence[str],
    tgt_texts: Sequence[str],
    max_len: int,
    max_len_ratio: float = 0.0,
    filter_long: bool = True,
) -> ParallelDataset:
    """Encode every pair. With ``filter_long`` (training data), drop pairs with an empty side, a side
    longer than ``max_len`` tokens, or a token-length ratio above ``max_len_ratio`` (0 = no ratio filter),
    logging how many. Without it (validation data, so that BLEU covers the whole set) every pair is kept
    and each side is cut to ``max_len`` tokens."""
    src, tgt, kept = [], [], []
    dropped = {"empty": 0, "too long": 0, "length ratio": 0}
    for line, (x_text, y_text) in enumerate(zip(src_texts, tgt_texts, strict=True)):
        x = np.asarray(tokenizer.encode(x_text), dtype=np.int32)
        y = np.asarray(tokenizer.encode(y_text), dtype=np.int32)
        if filter_long:
            reason = _drop_reason(len(x), len(y), max_len, max_len_ratio)
            if reason:
                dropped[reason] += 1
                continue
        else:  # kept whole for BLEU, but cut to fit the network's positions for the loss
            x, y = x[:max_len], y[:max_len]
        src.append(x)
        tgt.append(y)
        kept.append(line)
    if filter_long:
        logger.info(
            "kept %d of %d pairs (dropped: %s)",
            len(kept),
            len(src_texts),
            ", ".join(f"{n} {reason}" for reason, n in dropped.items()),
        )
    if not kept:
        hint = f"; raise data.max_len ({max_len}) or data.max_len_ratio" if filter_long else ""
        raise DataError(f"no pairs left to train on{hint}")
    return ParallelDataset(src, tgt, np.asarray(kept, dtype=np.int64))


def _drop_reason(src_len: int, tgt_len: int, max_len: int, max_len_ratio: float) -> str | None:
    if src_len == 0 or tgt_len == 0:
        return "empty"
    if src_len > max_len or tgt_len > max_len:
        return "too long"
    if max_len_ratio > 0 and max(src_len, tgt_len) > max_len_ratio * min(src_len, tgt_len):
        return "length ratio"
    return None


def make_batches(
    src_lens: np.ndarray, tgt_lens: np.ndarray, batch_tokens: int, seed: int, epoch: int
) -> list[np.ndarray]:
    """Token-budget batches of example indices, bucketed by length, in a seeded random order.

    Examples are sorted by (source, target) length with a random tiebreak and cut greedily so that
    ``n_sentences * max(len + 1 over both sides)`` stays within ``batch_tokens``; an example over the
    budget on its own gets its own batch. The batch order is then shuffled. Everything is drawn from
    one generator seeded by ``(seed, epoch)``: the same pair gives the same list, so a run resumes
    exactly from a stored (epoch, batch index).
    """
    src_lens, tgt_lens = np.asarray(src_lens), np.asarray(tgt_lens)
    rng = np.random.default_rng([seed, epoch])
    order = np.lexsort((rng.random(len(src_lens)), tgt_lens, src_lens))  # last key sorts first
    widths = np.maximum(src_lens, tgt_lens)[order] + 1  # + EOS on the source, + BOS/EOS on the target
    batches: list[np.ndarray] = []
    start, widest = 0, 0
    for end, width in enumerate(widths.tolist()):
        widest = max(widest, width)
        if end > start and (end - start + 1) * widest > batch_tokens:
            batches.append(order[start:end])
            start, widest = end, width
    if len(order):
        batches.append(order[start:])
    return [batches[i] for i in rng.permutation(len(batches))]


def shard(batches: Sequence[np.ndarray], rank: int, world_size: int) -> list[np.ndarray]:
    """This rank's batches for data-parallel training; every rank gets the same number.

    The list is padded by repeating batches from its start until it divides evenly (as PyTorch's
    ``DistributedSampler`` does), so every example is seen each epoch and a few twice; the repeats
    change with the epoch because the batch order does. Rank ``r`` takes batches ``r, r + W, ...``.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    if not batches:
        return []
    padded = list(batches) + [batches[i % len(batches)] for i in range(-len(batches) % world_size)]
    return padded[rank::world_size]


@dataclass(frozen=True)
class Batch:
    """One training batch; batch-first, padded with ``pad_id``, masks ``True`` at padding."""

    src: torch.Tensor  # (B, S) int64: x </s>
    src_pad_mask: torch.Tensor  # (B, S) bool
    tgt_in: torch.Tensor  # (B, T) int64: <s> y
    tgt_out: torch.Tensor  # (B, T) int64: y </s>
    tgt_pad_mask: torch.Tensor  # (B, T) bool, the same for tgt_in and tgt_out
    n_tgt_tokens: int  # non-padding tokens in tgt_out (the loss normaliser)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        moved = {
            name: getattr(self, name).to(device, non_blocking=non_blocking)
            for name in ("src", "src_pad_mask", "tgt_in", "tgt_out", "tgt_pad_mask")
        }
        return Batch(**moved, n_tgt_tokens=self.n_tgt_tokens)


def collate(
    dataset: ParallelDataset,
    indices: Sequence[int] | np.ndarray,
    pad_id: int = PAD_ID,
    bos_id: int = BOS_ID,
    eos_id: int = EOS_ID,
) -> Batch:
    """Pad the examples at ``indices`` into a ``Batch``, adding EOS to sources and BOS/EOS to targets."""
    xs = [dataset.src[i] for i in indices]
    ys = [dataset.tgt[i] for i in indices]
    src = np.full((len(xs), max(len(x) for x in xs) + 1), pad_id, dtype=np.int64)  # (B, S)
    tgt_in = np.full((len(ys), max(len(y) for y in ys) + 1), pad_id, dtype=np.int64)  # (B, T)
    tgt_out = tgt_in.copy()
    for row, (x, y) in enumerate(zip(xs, ys, strict=True)):
        src[row, : len(x)] = x
        src[row, len(x)] = eos_id
        tgt_in[row, 0] = bos_id
        tgt_in[row, 1 : len(y) + 1] = y
        tgt_out[row, : len(y)] = y
        tgt_out[row, len(y)] = eos_id
    src_lens = np.array([len(x) + 1 for x in xs])
    tgt_lens = np.array([len(y) + 1 for y in ys])
    return Batch(
        src=torch.from_numpy(src),
        src_pad_mask=torch.from_numpy(np.arange(src.shape[1]) >= src_lens[:, None]),
        tgt_in=torch.from_numpy(tgt_in),
        tgt_out=torch.from_numpy(tgt_out),
        tgt_pad_mask=torch.from_numpy(np.arange(tgt_in.shape[1]) >= tgt_lens[:, None]),
        n_tgt_tokens=int(tgt_lens.sum()),
    )
