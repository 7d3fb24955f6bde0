"""Train the one joint SentencePiece model shared by source and target, with the network's special ids."""

from __future__ import annotations

import gzip
import logging
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from model.config import BOS_ID, EOS_ID, PAD_ID, UNK_ID

logger = logging.getLogger(__name__)

MODEL_TYPES = ("unigram", "bpe", "char", "word")


class SpmError(ValueError):
    """SentencePiece training failed; the message says which tokenizer setting to change."""


def train_spm(
    sources: Iterable[str | Path],
    model_prefix: str | Path,
    vocab_size: int,
    model_type: str = "unigram",
    character_coverage: float = 1.0,
    input_sentence_size: int = 2_000_000,
    seed: int = 1,
    num_threads: int = 1,
) -> Path:
    """Train one joint model and return the path of ``{model_prefix}.model`` (``.vocab`` is written too).

    ``sources`` mixes two kinds of item: a ``Path`` is a text file (plain or ``.gz``, one sentence per
    line) and a ``str`` is one sentence. Pass the source and the target side of the training data, so
    both languages share the vocabulary (and, with tied embeddings, the embedding matrix).
    ``input_sentence_size`` caps how many sentences are sampled (0 = all). The same inputs and seed give
    the same model file, byte for byte, on any machine; that holds for ``num_threads=1`` only (more
    threads train faster but the pieces then depend on thread scheduling). Both files appear atomically:
    a failed run leaves nothing at ``model_prefix``.
    """
    if model_type not in MODEL_TYPES:
        raise SpmError(f"unknown SentencePiece model_type {model_type!r}; choose one of {MODEL_TYPES}")
    model_prefix = Path(model_prefix)
    model_prefix.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".spm-", dir=model_prefix.parent) as tmp:
        corpus = Path(tmp) / "corpus.txt"
        n_lines = _write_corpus(sources, corpus)
        if n_lines == 0:
            raise SpmError("no non-empty text to train SentencePiece on: check the training data")
        logger.info("training SentencePiece (%s, vocab %d) on %d sentences", model_type, vocab_size, n_lines)
        tmp_prefix = Path(tmp) / "spm"
        spm.SetRandomGeneratorSeed(seed)
        try:
            spm.SentencePieceTrainer.train(
                input=str(corpus),
                model_prefix=str(tmp_prefix),
                vocab_size=vocab_size,
                model_type=model_type,
                character_coverage=character_coverage,
                input_sentence_size=input_sentence_size,
                shuffle_input_sentence=True,
                pad_id=PAD_ID,
                unk_id=UNK_ID,
                bos_id=BOS_ID,
                eos_id=EOS_ID,
                pad_piece="<pad>",
                unk_piece="<unk>",
                bos_piece="<s>",
                eos_piece="</s>",
                hard_vocab_limit=False,  # a tiny corpus gets a smaller vocabulary instead of an error
                num_threads=num_threads,
                minloglevel=2,
            )
        except RuntimeError as error:
            raise SpmError(_explain(str(error), vocab_size)) from error
        _drop_temp_paths(tmp_prefix.with_suffix(".model"))
        for suffix in (".model", ".vocab"):
            os.replace(tmp_prefix.with_suffix(suffix), model_prefix.with_name(model_prefix.name + suffix))
    model_path = model_prefix.with_name(model_prefix.name + ".model")
    size = spm.SentencePieceProcessor(model_file=str(model_path)).get_piece_size()
    if size < vocab_size:
        logger.warning("SentencePiece vocabulary has %d pieces, fewer than the %d asked", size, vocab_size)
    return model_path


def _drop_temp_paths(model_file: Path) -> None:
    """Clear the temporary input/prefix paths SentencePiece records, so the file depends on the data only."""
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    del proto.trainer_spec.input[:]
    proto.trainer_spec.model_prefix = ""
    model_file.write_bytes(proto.SerializeToString())


def _write_corpus(sources: Iterable[str | Path], out: Path) -> int:
    """Write every non-empty sentence of ``sources`` to ``out``, one per line; return how many."""
    n_lines = 0
    with out.open("w", encoding="utf-8", newline="\n") as sink:
        for item in sources:
            lines = _read_lines(item) if isinstance(item, Path) else item.splitlines()
            for line in lines:
                if line.strip():
                    sink.write(line.rstrip("\r\n") + "\n")
                    n_lines += 1
    return n_lines


def _read_lines(path: Path) -> Iterable[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", newline="\n") as lines:
        yield from lines


def _explain(message: str, vocab_size: int) -> str:
    hint = "check the tokenizer settings and the training text"
    if "required_chars" in message:
        hint = f"raise tokenizer.vocab_size (now {vocab_size}) or lower tokenizer.character_coverage"
    elif "too high" in message:
        hint = f"lower tokenizer.vocab_size (now {vocab_size}); the corpus is too small for it"
    return f"SentencePiece training failed: {message.strip()}; {hint}"
