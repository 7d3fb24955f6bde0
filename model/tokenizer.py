"""SentencePiece wrappers, text <-> ids: our joint vocabulary, or an imported Marian model's pair of models
mapped through its shared vocabulary file; and padding sources for the encoder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import sentencepiece as spm

from model.config import BOS_ID, EOS_ID, PAD_ID, UNK_ID, ModelConfig
from model.model_dir import ModelInfo


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
        # One call per text: SentencePiece's list form starts a thread pool on every call (~0.4 ms, more on a busy
        # CPU), where one short sentence takes ~5 µs; the service encodes one request's few sentences at a time.
        return [self.sp.encode(text, out_type=int) for text in texts]

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([i for i in ids if i not in (PAD_ID, BOS_ID, EOS_ID)])

    def decode_batch(self, batch: list[list[int]]) -> list[str]:
        return [self.decode(ids) for ids in batch]

    def pieces(self, ids: list[int]) -> list[str]:
        return [self.sp.id_to_piece(i) for i in ids]


class VocabTokenizer:
    """A Marian (OPUS-MT) tokenizer: ``source.spm`` cuts source text and ``target.spm`` joins target pieces,
    and ``vocab.json`` maps pieces to the network's ids (they differ from either spm's own ids)."""

    def __init__(self, source: Path, target: Path, vocab: Path, config: ModelConfig) -> None:
        self.path = Path(source)
        self.source = spm.SentencePieceProcessor(model_file=str(source))
        self.target = spm.SentencePieceProcessor(model_file=str(target))
        self.vocab: dict[str, int] = json.loads(Path(vocab).read_text(encoding="utf-8"))
        self.id_to_piece = {i: piece for piece, i in self.vocab.items()}
        self.pad_id, self.unk_id, self.bos_id, self.eos_id = config.pad_id, config.unk_id, config.bos_id, config.eos_id
        self._special = {self.pad_id, self.bos_id, self.eos_id}

    @property
    def vocab_size(self) -> int:
        return max(self.vocab.values()) + 1

    def encode(self, text: str) -> list[int]:
        return [self.vocab.get(piece, self.unk_id) for piece in self.source.encode(text, out_type=str)]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def decode(self, ids: list[int]) -> str:
        return self.target.decode([self.id_to_piece.get(i, "<unk>") for i in ids if i not in self._special])

    def decode_batch(self, batch: list[list[int]]) -> list[str]:
        return [self.decode(ids) for ids in batch]

    def pieces(self, ids: list[int]) -> list[str]:
        return [self.id_to_piece.get(i, "<unk>") for i in ids]


def load_tokenizer(info: ModelInfo) -> Tokenizer | VocabTokenizer:
    """The tokenizer a model dir declares: our joint spm, or an imported model's spm pair + vocabulary."""
    spec = info.tokenizer_spec
    if spec is None:
        return Tokenizer(info.tokenizer_file)
    if spec.get("type") != "marian":
        raise ValueError(f"{info.path / 'model.json'}: unknown tokenizer type {spec.get('type')!r}; expected marian")
    return VocabTokenizer(*(info.path / spec[k] for k in ("source", "target", "vocab")), info.config)


def pad_sources(
    seqs: list[list[int]], max_len: int | None = None, pad_id: int = PAD_ID, eos_id: int = EOS_ID
) -> tuple[np.ndarray, np.ndarray]:
    """Source ids as the encoder expects them: EOS appended, right-padded.

    Returns ids (B, S) int64 and the padding mask (B, S) bool, True at padding. ``max_len`` truncates
    each source (before its EOS) so that it fits the model's positions.
    """
    if max_len is not None:
        seqs = [s[: max_len - 1] for s in seqs]
    width = max(len(s) for s in seqs) + 1
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.ones((len(seqs), width), dtype=bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        ids[i, len(s)] = eos_id
        mask[i, : len(s) + 1] = False
    return ids, mask
