"""Tune a model dir's decoding defaults (beam size, length penalty) on validation data; record the best.

    .venv/bin/python scripts/tune_decoding.py models/multi30k-de-en \
        --src PATH/val.de.gz --ref PATH/val.en.gz [--beams 4,5,6] [--alphas 0.6,0.8,1.0,1.2]

Prints the grid (best first) and writes the winner into model.json's ``decoding`` section, which mt-serve
uses for requests that leave beam_size/length_penalty unset. Never tune on a test set.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from training.data import read_parallel
from training.tune import record_decoding, tune_decoding


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--src", type=Path, required=True, help="validation sources (plain or .gz)")
    parser.add_argument("--ref", type=Path, required=True, help="validation references (plain or .gz)")
    parser.add_argument("--split", default="val", help="name recorded for the data used (default: val)")
    parser.add_argument("--beams", default="4,5,6", help="comma-separated beam sizes")
    parser.add_argument("--alphas", default="0.6,0.8,1.0,1.2", help="comma-separated length penalties")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = time.perf_counter()
    sources, references = read_parallel((args.src, args.ref))
    table = tune_decoding(
        args.model_dir,
        sources,
        references,
        [int(b) for b in args.beams.split(",")],
        [float(a) for a in args.alphas.split(",")],
    )
    print(f"{'beam':>4} {'alpha':>5} {'BLEU':>6} {'chrF':>6}")
    for row in table:
        print(f"{row['beam_size']:>4} {row['length_penalty']:>5.2f} {row['bleu']:>6.2f} {row['chrf']:>6.2f}")
    chosen = record_decoding(args.model_dir, table, args.split)
    print(f"recorded in model.json: {chosen} ({time.perf_counter() - started:.0f}s)\n  {table[0]['bleu_signature']}")


if __name__ == "__main__":
    main()
