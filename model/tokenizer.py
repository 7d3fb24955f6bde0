"""SentencePiece wrapper: one joint source/target vocabulary, text <-> ids, and the special ids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import sentencepiece as spm

from model.config import BOS_ID, EOS_ID, PAD_ID, UNK_ID


class Tokenizer:
    """Encodes text to subword ids and back; the SentencePiece model must use our special ids."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"SentencePiece model not found: {path}")
        self.path = path
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        found = (self.sp.pad_id(), self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id())
        if found != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
            raise ValueError(
                f"{path}: special ids (pad, unk, bos, eos) are {found}, expected "
                f"{(PAD_ID, UNK_ID, BOS_ID, EOS_ID)}; train it with training/spm.py"
            )

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    pad_id, unk_id, bos_id, eos_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text, out_type=int)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts, out_type=int)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([i for i in ids if i not in (PAD_ID, BOS_ID, EOS_ID)])

    def decode_batch(self, batch: list[list[int]]) -> list[str]:
        return [self.decode(ids) for ids in batch]

    def pieces(self, ids: list[int]) -> list[str]:
        return [self.sp.id_to_piece(i) for i in ids]


def pad_sources(seqs: list[list[int]], max_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Source ids as the encoder expects them: EOS appended, right-padded.

    Returns ids (B, S) int64 and the padding mask (B, S) bool, True at padding. ``max_len`` truncates
    each source (before its EOS) so that it fits the model's positions.
    """
    if max_len is not None:
        seqs = [s[: max_len - 1] for s in seqs]
    width = max(len(s) for s in seqs) + 1
    ids = np.full((len(seqs), width), PAD_ID, dtype=np.int64)
    mask = np.ones((len(seqs), width), dtype=bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        ids[i, len(s)] = EOS_ID
        mask[i, : len(s) + 1] = False
    return ids, mask
