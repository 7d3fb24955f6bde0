"""Score a model directory on a test set with its decoding defaults and record BLEU/chrF in its model.json.

    .venv/bin/python scripts/record_eval.py models/multi30k-de-en --name test2016 \
        --src PATH/test_2016_flickr.de.gz --ref PATH/test_2016_flickr.en.gz

The beam size and length penalty are model.json's ``decoding`` section (the service's defaults: beam 4,
α 0.6 unless tuned on val by scripts/tune_decoding.py) unless given. Decodes with the torch network
through the same ``model.decode`` path as training-time validation (the ONNX fp32 export gives the same
tokens), and writes ``eval.<name>`` with both sacreBLEU signatures.
"""

from __future__ import annotations

import argparse
import gzip
import time
from dataclasses import replace
from pathlib import Path

from model.decode import score_translations
from model.model_dir import record_eval
from model.tokenizer import load_tokenizer
from model.weights import load_model
from training.evaluate import translate_texts


def read(path: Path) -> list[str]:
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return data.decode("utf-8").splitlines()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--name", required=True, help="key under eval in model.json, e.g. test2016")
    parser.add_argument("--src", type=Path, required=True)
    parser.add_argument("--ref", type=Path, required=True)
    parser.add_argument("--beam-size", type=int, help="default: model.json's decoding.beam_size")
    parser.add_argument("--length-penalty", type=float, help="default: model.json's decoding.length_penalty")
    args = parser.parse_args()
    model, info = load_model(args.model_dir)
    tokenizer = load_tokenizer(info)
    sources, refs = read(args.src), read(args.ref)
    given = {"beam_size": args.beam_size, "length_penalty": args.length_penalty}
    search = replace(info.decoding, **{k: v for k, v in given.items() if v is not None})
    started = time.perf_counter()
    result = score_translations(translate_texts(model, tokenizer, sources, search), refs, info.target_lang)
    result.update(sentences=len(sources), source=args.src.name, reference=args.ref.name)
    result["decoding"] = {
        "beam_size": search.beam_size,
        "length_penalty": search.length_penalty,
        "max_length_offset": search.max_length_offset,
    }
    record_eval(args.model_dir, args.name, result)
    print(f"{args.name}: BLEU {result['bleu']} chrF {result['chrf']} ({time.perf_counter() - started:.0f}s)")
    print(f"  {result['bleu_signature']}\n  {result['chrf_signature']}")


if __name__ == "__main__":
    main()
