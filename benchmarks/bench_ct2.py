"""Our ONNX decoder against CTranslate2 on the same weights: our own converter, a token-parity check, a timed table.

    .venv/bin/pip install -e '.[bench]'       # ctranslate2 (never needed to serve)
    .venv/bin/python benchmarks/bench_ct2.py --model-dir models/multi30k-de-en \\
        --src /work/shared/data/multi30k/test_2016_flickr.de.gz --n 1000

1. Conversion: the model dir's weights (safetensors, read without torch) become a CTranslate2
   ``TransformerSpec``: q/k/v fused as CTranslate2 wants them, post- or pre-norm as the config says, our
   interleaved sinusoid table given explicitly (CTranslate2's own is laid out differently), tied
   embeddings as the projection. Written to ``--ct2-dir`` (default MODEL_DIR/ct2; refused if it exists
   unless ``--force``).
2. Parity: greedy decoding of the first ``--parity`` sentences by both engines must give the same tokens.
3. Timing: the same length-sorted batches for both engines, interleaved batch by batch in one process,
   tokenization outside the timing, each engine given the same thread count. Ours is the service's path
   (``OrtModel`` step function + ``model.search``), CTranslate2's ``Translator.translate_batch`` with
   ``max_decoding_length`` = longest source of the batch + 50. Ratios are ours / CTranslate2 in target
   tokens per second (output tokens + EOS, each engine counting its own); latency rows are p50 over batches
   of one sentence (ratio > 1: ours is faster). CTranslate2's beam search stops a sentence once beam_size
   hypotheses have finished; ours by default only when no live beam can still win (exact). The
   "patience 1" rows give ours CTranslate2's rule (``DecodingOptions.patience``), so both run the same search.
   "ours host": the share of ours' time spent outside onnxruntime's runs (the search and the step function's
   Python, ``session_clock.py``); CTranslate2's search runs in C++.
"""

from __future__ import annotations

import argparse
import gzip
import os
import platform
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from session_clock import SessionClock

from model.decode import search_batch
from model.decoding import DecodingOptions
from model.model_dir import ModelInfo, read_model_dir
from model.runtime import OrtModel, session_options
from model.tokenizer import Tokenizer, pad_sources


def sinusoidal_table(max_positions: int, d_model: int) -> np.ndarray:
    """The network's position table (``model.transformer.sinusoidal_table``) in numpy: sin/cos interleaved."""
    position = np.arange(max_positions, dtype=np.float32)[:, None]
    inv_freq = np.exp(np.arange(0, d_model, 2, dtype=np.float32) * np.float32(-np.log(10000.0) / d_model))
    table = np.zeros((max_positions, d_model), dtype=np.float32)
    table[:, 0::2] = np.sin(position * inv_freq)
    table[:, 1::2] = np.cos(position * inv_freq[: d_model // 2])
    return table


def read_text(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return f.read().splitlines()


# ---- conversion ----


def _linear(spec, weights: dict[str, np.ndarray], *names: str) -> None:
    """Set a CTranslate2 LinearSpec from one or several (fused along the output axis) of our nn.Linear."""
    spec.weight = np.concatenate([weights[f"{n}.weight"] for n in names], axis=0)
    spec.bias = np.concatenate([weights[f"{n}.bias"] for n in names], axis=0)


def _layer_norm(spec, weights: dict[str, np.ndarray], name: str) -> None:
    spec.gamma, spec.beta = weights[f"{name}.weight"], weights[f"{name}.bias"]


def _attention(spec, weights: dict[str, np.ndarray], scope: str, self_attention: bool) -> None:
    if self_attention:
        _linear(spec.linear[0], weights, f"{scope}.q_proj", f"{scope}.k_proj", f"{scope}.v_proj")
    else:
        _linear(spec.linear[0], weights, f"{scope}.q_proj")
        _linear(spec.linear[1], weights, f"{scope}.k_proj", f"{scope}.v_proj")
    _linear(spec.linear[-1], weights, f"{scope}.out_proj")


def convert_to_ct2(info: ModelInfo, out_dir: Path, force: bool = False) -> Path:
    """Write ``info``'s weights as a CTranslate2 model directory; returns ``out_dir``."""
    import ctranslate2
    from safetensors.numpy import load_file

    cfg = info.config
    if not cfg.tie_embeddings:
        raise SystemExit("bench_ct2: only tied-embedding models are converted (tie_embeddings: true)")
    if out_dir.exists() and not force:
        raise SystemExit(f"bench_ct2: {out_dir} exists: add --force to replace it")
    weights = {k: v.astype(np.float32) for k, v in load_file(str(info.weights_file)).items()}
    spec = ctranslate2.specs.TransformerSpec.from_config(
        (cfg.n_encoder_layers, cfg.n_decoder_layers), cfg.n_heads, pre_norm=cfg.pre_norm
    )
    spec.config.layer_norm_epsilon = 1e-5  # torch's LayerNorm default
    table = sinusoidal_table(cfg.max_positions, cfg.d_model)  # (P, D), sin/cos interleaved
    for stack, prefix in ((spec.encoder, "encoder_layers"), (spec.decoder, "decoder_layers")):
        embeddings = stack.embeddings if isinstance(stack.embeddings, list) else [stack.embeddings]
        embeddings[0].weight = weights["embed.weight"]
        stack.position_encodings.encodings = table
        if cfg.pre_norm:
            _layer_norm(stack.layer_norm, weights, prefix.replace("_layers", "_norm"))
        for i, layer in enumerate(stack.layer):
            scope = f"{prefix}.{i}"
            _attention(layer.self_attention, weights, f"{scope}.self_attn", self_attention=True)
            _layer_norm(layer.self_attention.layer_norm, weights, f"{scope}.self_attn_sub.norm")
            if prefix == "decoder_layers":
                _attention(layer.attention, weights, f"{scope}.cross_attn", self_attention=False)
                _layer_norm(layer.attention.layer_norm, weights, f"{scope}.cross_attn_sub.norm")
            _linear(layer.ffn.linear_0, weights, f"{scope}.ffn.w1")
            _linear(layer.ffn.linear_1, weights, f"{scope}.ffn.w2")
            _layer_norm(layer.ffn.layer_norm, weights, f"{scope}.ffn_sub.norm")
    spec.decoder.projection.weight = weights["embed.weight"]
    spec.decoder.projection.bias = np.zeros(cfg.vocab_size, dtype=np.float32)
    tokenizer = Tokenizer(info.tokenizer_file)
    pieces = tokenizer.pieces(list(range(tokenizer.vocab_size)))
    spec.register_source_vocabulary(pieces)
    spec.register_target_vocabulary(pieces)
    spec.validate()  # reports every missing variable at once
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    spec.save(str(out_dir))
    return out_dir


# ---- the two engines, same call shape ----


@dataclass(frozen=True)
class Case:
    name: str
    variant: str  # fp32 | int8
    beam_size: int
    threads: int
    batch_size: int
    patience: float | None = None  # ours: None = the exact stopping rule (the default); 1.0 = CTranslate2's


class Ours:
    """The service's decoding path: ONNX encoder + decoder step driven by ``model.search``."""

    def __init__(self, info: ModelInfo, onnx_variant: str, threads: int) -> None:
        self.info = info
        self.model = OrtModel.load(info.path, onnx_variant, options=session_options(threads))
        self.clock = SessionClock(self.model)  # time inside onnxruntime: the rest of ours is host (Python) time

    def translate(self, sources: list[list[int]], options: DecodingOptions) -> list[list[int]]:
        ids, mask = pad_sources(sources)
        step_fn = self.model.step_function(ids, mask)
        hyps = search_batch(step_fn, [len(s) for s in sources], self.info.config, options)
        return [h[0].tokens for h in hyps]


class CT2:
    def __init__(self, ct2_dir: Path, compute_type: str, threads: int, tokenizer: Tokenizer) -> None:
        import ctranslate2

        self.translator = ctranslate2.Translator(
            str(ct2_dir), device="cpu", compute_type=compute_type, intra_threads=threads, inter_threads=1
        )
        self.piece_id = {p: i for i, p in enumerate(tokenizer.pieces(list(range(tokenizer.vocab_size))))}
        self.tokenizer = tokenizer

    def pieces(self, sources: list[list[int]]) -> list[list[str]]:
        return [[*self.tokenizer.pieces(s), "</s>"] for s in sources]

    def translate(self, pieces: list[list[str]], options: DecodingOptions) -> list[list[int]]:
        results = self.translator.translate_batch(
            pieces,
            beam_size=options.beam_size,
            length_penalty=options.length_penalty,
            max_decoding_length=max(len(p) for p in pieces) - 1 + options.max_length_offset,
            max_batch_size=0,
        )
        return [[self.piece_id[p] for p in r.hypotheses[0]] for r in results]


def batches(sources: list[list[int]], size: int) -> list[list[int]]:
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    return [order[i : i + size] for i in range(0, len(order), size)]


def run_case(case: Case, info: ModelInfo, ct2_dir: Path, sources: list[list[int]], tok: Tokenizer) -> dict:
    ours = Ours(info, case.variant, case.threads)
    theirs = CT2(ct2_dir, "int8" if case.variant == "int8" else "float32", case.threads, tok)
    options = DecodingOptions(beam_size=case.beam_size, patience=case.patience)
    plan = batches(sources, case.batch_size)
    inputs = [([sources[i] for i in b], theirs.pieces([sources[i] for i in b])) for b in plan]
    ours.translate(*inputs[0][:1], options)  # warm both engines up
    theirs.translate(inputs[0][1], options)
    ours.clock.seconds = 0.0
    times: dict[str, list[float]] = {"ours": [], "ct2": []}
    tokens = {"ours": 0, "ct2": 0}
    same = 0
    for i, (ids, pieces) in enumerate(inputs):
        runs: list[tuple[str, Callable[[], list[list[int]]]]] = [
            ("ours", lambda ids=ids: ours.translate(ids, options)),
            ("ct2", lambda pieces=pieces: theirs.translate(pieces, options)),
        ]
        outs = {}
        for name, run in runs if i % 2 == 0 else runs[::-1]:  # alternate who goes first
            started = time.perf_counter()
            outs[name] = run()
            times[name].append(time.perf_counter() - started)
            tokens[name] += sum(len(t) + 1 for t in outs[name])
        same += sum(a == b for a, b in zip(outs["ours"], outs["ct2"], strict=True))
    row = {"case": case.name, "same": same, "n": len(sources), "host": 1 - ours.clock.seconds / sum(times["ours"])}
    for name in times:
        row[f"{name}_tps"] = tokens[name] / sum(times[name])
        row[f"{name}_p50_ms"] = 1000 * statistics.median(times[name])
    if case.batch_size == 1:
        row["ratio"] = row["ct2_p50_ms"] / row["ours_p50_ms"]
    else:
        row["ratio"] = row["ours_tps"] / row["ct2_tps"]
    return row


CASES = (
    Case("fp32, beam 4, batch 32, 1 thread", "fp32", 4, 1, 32),
    Case("fp32, beam 4, batch 32, 2 threads", "fp32", 4, 2, 32),
    Case("fp32, greedy, batch 32, 1 thread", "fp32", 1, 1, 32),
    Case("int8, beam 4, batch 32, 1 thread", "int8", 4, 1, 32),
    Case("int8, greedy, batch 32, 1 thread", "int8", 1, 1, 32),
    Case("fp32, beam 4, batch 1 p50 latency", "fp32", 4, 1, 1),
    Case("int8, beam 4, batch 1 p50 latency", "int8", 4, 1, 1),
    # The same search on both sides: ours with CTranslate2's stopping rule (patience 1) instead of the exact one.
    Case("fp32, beam 4, batch 32, patience 1", "fp32", 4, 1, 32, 1.0),
    Case("fp32, beam 4, batch 32, 2 thr, pat. 1", "fp32", 4, 2, 32, 1.0),
    Case("fp32, beam 4, batch 1 p50, patience 1", "fp32", 4, 1, 1, 1.0),
    Case("int8, beam 4, batch 32, patience 1", "int8", 4, 1, 32, 1.0),
)


def parity(info: ModelInfo, ct2_dir: Path, sources: list[list[int]], tok: Tokenizer) -> tuple[int, int]:
    """Greedy tokens of both engines on ``sources``: (identical, total)."""
    ours, theirs = Ours(info, "fp32", 1), CT2(ct2_dir, "float32", 1, tok)
    greedy = DecodingOptions(beam_size=1)
    same = 0
    for batch in batches(sources, 32):
        ids = [sources[i] for i in batch]
        got = zip(ours.translate(ids, greedy), theirs.translate(theirs.pieces(ids), greedy), strict=True)
        same += sum(a == b for a, b in got)
    return same, len(sources)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=Path("models/multi30k-de-en"))
    parser.add_argument("--src", type=Path, required=True, help="source sentences, one per line (.gz read too)")
    parser.add_argument("--n", type=int, default=1000, help="sentences timed (batch-1 rows use the first 200)")
    parser.add_argument("--parity", type=int, default=200, help="sentences of the greedy token-parity check")
    parser.add_argument("--ct2-dir", type=Path, help="where the converted model goes (default MODEL_DIR/ct2)")
    parser.add_argument("--force", action="store_true", help="replace an existing --ct2-dir")
    parser.add_argument("--cases", help="comma-separated indices into the case list (default: all)")
    args = parser.parse_args()

    info = read_model_dir(args.model_dir)
    tok = Tokenizer(info.tokenizer_file)
    ct2_dir = args.ct2_dir or info.path / "ct2"
    if args.force or not (ct2_dir / "model.bin").is_file():
        convert_to_ct2(info, ct2_dir, force=True)
    sources = [s for s in tok.encode_batch(read_text(args.src)[: args.n]) if s]
    import ctranslate2

    print(
        f"ctranslate2 {ctranslate2.__version__}, onnxruntime {ort.__version__}, {platform.processor() or '?'}, "
        f"{os.cpu_count()} cores; {len(sources)} sentences from {args.src}"
    )
    same, total = parity(info, ct2_dir, sources[: args.parity], tok)
    print(f"greedy token parity (fp32): {same}/{total} sentences identical")
    chosen = CASES if not args.cases else [CASES[int(i)] for i in args.cases.split(",")]
    print(
        f"{'case':36} {'ours tok/s':>10} {'ct2 tok/s':>10} {'ours p50 ms':>11} {'ct2 p50 ms':>10} {'same':>9} "
        f"{'ours/ct2':>8} {'ours host':>9}"
    )
    for case in chosen:
        subset = sources[:200] if case.batch_size == 1 else sources
        row = run_case(case, info, ct2_dir, subset, tok)
        print(
            f"{row['case']:36} {row['ours_tps']:>10.0f} {row['ct2_tps']:>10.0f} {row['ours_p50_ms']:>11.1f} "
            f"{row['ct2_p50_ms']:>10.1f} {row['same']:>4}/{row['n']:<4} {row['ratio']:>7.2f}x {row['host']:>9.0%}",
            flush=True,
        )


if __name__ == "__main__":
    main()
