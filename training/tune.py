"""Tune the decoding defaults (beam size, length penalty α) of a model dir on validation data.

The grid is scored with the same decoding path and sacreBLEU settings as every other BLEU the project
reports; the winner becomes ``model.json``'s ``decoding`` section, which the service uses for requests
that do not set these fields. Only validation data may be used here: test sets are scored once, after.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from model.decode import score_translations, translate_ids
from model.decoding import PAPER
from model.model_dir import MODEL_JSON, atomic_write_text
from model.tokenizer import load_tokenizer
from model.torch_step import TorchStepFunction
from model.weights import load_model

log = logging.getLogger(__name__)


def tune_decoding(
    model_dir: Path,
    sources: Sequence[str],
    references: Sequence[str],
    beam_sizes: Sequence[int] = (4, 5, 6),
    length_penalties: Sequence[float] = (0.6, 0.8, 1.0, 1.2),
    batch_size: int = 64,
) -> list[dict[str, Any]]:
    """BLEU and chrF of every (beam, α) pair on ``sources``/``references``, best first.

    Ties in BLEU go to higher chrF, then to the smaller beam (faster) and the paper's α.
    """
    model, info = load_model(model_dir)
    tokenizer = load_tokenizer(info)
    src_ids = tokenizer.encode_batch(list(sources))
    rows = []
    for beam in beam_sizes:
        for alpha in length_penalties:
            options = replace(PAPER, beam_size=beam, length_penalty=alpha)
            ids = translate_ids(partial(TorchStepFunction, model), src_ids, info.config, options, batch_size)
            scores = score_translations(tokenizer.decode_batch(ids), references, info.target_lang)
            log.info("beam %d, α %.2f: BLEU %.2f chrF %.2f", beam, alpha, scores["bleu"], scores["chrf"])
            rows.append({"beam_size": beam, "length_penalty": alpha, **scores})
    return sorted(
        rows,
        key=lambda r: (-r["bleu"], -r["chrf"], r["beam_size"], abs(r["length_penalty"] - PAPER.length_penalty)),
    )


def record_decoding(model_dir: Path, table: list[dict[str, Any]], split: str) -> dict[str, Any]:
    """Write the best row as ``model.json``'s ``decoding`` defaults and the whole table beside it."""
    best = table[0]
    meta_path = model_dir / MODEL_JSON
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    meta["decoding"] = {
        "beam_size": best["beam_size"],
        "length_penalty": best["length_penalty"],
        "max_length_offset": meta.get("decoding", {}).get("max_length_offset", PAPER.max_length_offset),
        "tuned_on": split,
    }
    meta["decoding_tuning"] = {
        "split": split,
        "bleu_signature": best["bleu_signature"],
        "grid": [{k: r[k] for k in ("beam_size", "length_penalty", "bleu", "chrf")} for r in table],
    }
    atomic_write_text(meta_path, json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    return meta["decoding"]
