"""mt-import: convert a model trained elsewhere into one of our model dirs (today: Marian / OPUS-MT)."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

from model.decoding import PAPER
from model.model_dir import write_model_json
from model.version import package_version

# What a Marian model saved in the Hugging Face layout must hold; either weights file will do.
TOKENIZER_FILES = ("source.spm", "target.spm", "vocab.json")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mt-import",
        description="Convert a Marian (OPUS-MT) model saved in the Hugging Face layout (config.json, "
        "model.safetensors or pytorch_model.bin, source.spm, target.spm, vocab.json) from a local directory "
        "into a model dir that mt-export and mt-serve use unchanged. Nothing is downloaded.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    parser.add_argument("kind", choices=["marian"], help="the kind of model to import")
    parser.add_argument("src_dir", type=Path, help="the model as saved by transformers (save_pretrained)")
    parser.add_argument("out_dir", type=Path, help="the model dir to write")
    parser.add_argument("--source", help="source language code (default: from the model's files or its name)")
    parser.add_argument("--target", help="target language code (default: from the model's files or its name)")
    parser.add_argument("--force", action="store_true", help="overwrite OUT_DIR if it already holds files")
    return parser


def languages(src_dir: Path, source: str | None, target: str | None) -> tuple[str, str]:
    """The pair from --source/--target, tokenizer_config.json, or a name like ``opus-mt-de-en``."""
    found: dict[str, str] = {}
    config = src_dir / "tokenizer_config.json"
    if config.is_file():
        data = json.loads(config.read_text(encoding="utf-8"))
        found = {k: data[f"{k}_lang"] for k in ("source", "target") if isinstance(data.get(f"{k}_lang"), str)}
    named = re.search(r"opus-mt-([a-z]{2,3})-([a-z]{2,3})$", src_dir.resolve().name)
    if named:
        found = {"source": named.group(1), "target": named.group(2), **found}
    pair = (source or found.get("source"), target or found.get("target"))
    if None in pair:
        raise ValueError(
            f"cannot tell the languages of {src_dir} (no source_lang/target_lang in tokenizer_config.json and "
            "no opus-mt-xx-yy name): pass --source and --target"
        )
    return pair[0], pair[1]


def import_marian(src_dir: Path, out_dir: Path, source: str | None, target: str | None, force: bool) -> Path:
    from importers.marian import import_network
    from model.transformer import Transformer
    from model.weights import save_weights

    missing = [name for name in ("config.json", *TOKENIZER_FILES) if not (src_dir / name).is_file()]
    if not any((src_dir / name).is_file() for name in WEIGHT_FILES):
        missing.append(" or ".join(WEIGHT_FILES))
    if missing:
        raise ValueError(f"{src_dir} is not a Marian model in the Hugging Face layout: missing {', '.join(missing)}")
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise FileExistsError(f"{out_dir} already holds files; pass --force to overwrite them")
    src_lang, tgt_lang = languages(src_dir, source, target)
    vocab = json.loads((src_dir / "vocab.json").read_text(encoding="utf-8"))
    cfg, state = import_network(src_dir, unk_id=vocab.get("<unk>", 1))
    model = Transformer(cfg)
    model.load_state_dict(state)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_weights(model, out_dir / "weights.safetensors")
    for name in TOKENIZER_FILES:
        shutil.copyfile(src_dir / name, out_dir / name)
    generation = src_dir / "generation_config.json"
    beams = json.loads(generation.read_text(encoding="utf-8")).get("num_beams") if generation.is_file() else None
    write_model_json(
        out_dir,
        cfg,
        src_lang,
        tgt_lang,
        tokenizer={"type": "marian", "source": "source.spm", "target": "target.spm", "vocab": "vocab.json"},
        decoding={"beam_size": beams or PAPER.beam_size, "length_penalty": PAPER.length_penalty},
        imported={"kind": "marian", "from": src_dir.resolve().name},
    )
    return out_dir


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = import_marian(args.src_dir, args.out_dir, args.source, args.target, args.force)
    except (ValueError, FileExistsError) as error:  # MarianImportError is a ValueError
        print(f"mt-import: {error}", file=sys.stderr)
        return 2
    print(f"mt-import: wrote model directory {out}; next: mt-export {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
