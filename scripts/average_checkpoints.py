"""Average chosen checkpoints of a run into a new model dir (fairseq's average_checkpoints.py, for our runs).

    .venv/bin/python scripts/average_checkpoints.py runs/multi30k-de-en/checkpoints/step_00{18,19,20}*.pt \
        --model-dir runs/multi30k-de-en --out runs/avg-18k-20k \
        [--fp16] [--valid-src PATH/val.de.gz --valid-ref PATH/val.en.gz]

``mt-train`` averages the last ``train.average_last`` checkpoints at the end of a run; this script averages
any window after the fact (e.g. wider, once the learning rate has decayed further). OUT gets MODEL_DIR's
tokenizer and ``model.json`` (config, languages, decoding defaults) with the averaged weights, and
``model.json`` records which checkpoints went in (``training.weights``) and drops MODEL_DIR's scores (they
were another model's). With a validation set the new model dir is scored with its decoding defaults and
the score is recorded as ``eval.valid``. Never choose the window on a test set.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from model.decode import score_translations
from model.model_dir import MODEL_JSON, atomic_write_text, read_model_dir, record_eval
from model.tokenizer import load_tokenizer
from model.transformer import Transformer
from model.weights import load_model, save_weights
from training.checkpoint import average_state_dicts
from training.data import read_parallel
from training.evaluate import translate_texts


def average_into(checkpoints: list[Path], model_dir: Path, out: Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write OUT: MODEL_DIR's tokenizer and model.json, the mean of ``checkpoints``' weights."""
    info = read_model_dir(model_dir)
    model = Transformer(info.config)
    model.load_state_dict(average_state_dicts(checkpoints))
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(info.tokenizer_file, out / info.tokenizer_file.name)
    meta = json.loads((model_dir / MODEL_JSON).read_text(encoding="utf-8"))
    names = ", ".join(path.name for path in checkpoints)
    meta["training"] = {**meta.get("training", {}), "weights": f"average of {len(checkpoints)}: {names}"}
    for stale in ("eval", "candidates"):
        meta.pop(stale, None)
    save_weights(model, out / meta.get("weights", "weights.safetensors"), dtype)
    atomic_write_text(out / MODEL_JSON, json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    return out


def score_valid(model_dir: Path, src: Path, ref: Path, split: str) -> dict:
    """BLEU/chrF of MODEL_DIR on (src, ref) with its decoding defaults, recorded as ``eval.valid``."""
    model, info = load_model(model_dir)
    sources, references = read_parallel((src, ref))
    hypotheses = translate_texts(model, load_tokenizer(info), sources, info.decoding)
    result = score_translations(hypotheses, references, info.target_lang)
    decoding = {"beam_size": info.decoding.beam_size, "length_penalty": info.decoding.length_penalty}
    record_eval(model_dir, "valid", {"split": split, **decoding, **result})
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", type=Path, nargs="+", help="mt-train checkpoints (step_*.pt) to average")
    parser.add_argument("--model-dir", type=Path, required=True, help="the run's model dir (its config, tokenizer)")
    parser.add_argument("--out", type=Path, required=True, help="new model dir to write (must not exist)")
    parser.add_argument("--fp16", action="store_true", help="store the weights in fp16 (half the size)")
    parser.add_argument("--valid-src", type=Path, help="validation sources (plain or .gz) to score the result")
    parser.add_argument("--valid-ref", type=Path, help="validation references")
    parser.add_argument("--split", default="val", help="name recorded for the validation data (default: val)")
    args = parser.parse_args(argv)
    if (args.valid_src is None) != (args.valid_ref is None):
        parser.error("give both --valid-src and --valid-ref, or neither")
    if args.out.exists():
        parser.error(f"{args.out} exists: choose a new directory for the averaged model")
    if missing := [str(p) for p in args.checkpoints if not p.is_file()]:
        parser.error(f"no such checkpoint: {', '.join(missing)}")
    out = average_into(args.checkpoints, args.model_dir, args.out, torch.float16 if args.fp16 else torch.float32)
    print(f"wrote {out} (average of {len(args.checkpoints)} checkpoints)")
    if args.valid_src is not None:
        result = score_valid(out, args.valid_src, args.valid_ref, args.split)
        print(f"{args.split}: BLEU {result['bleu']:.2f} chrF {result['chrf']:.2f}\n  {result['bleu_signature']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
