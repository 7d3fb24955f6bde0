"""Decoding throughput of the exported graphs against torch: the same sentences, beam 4, batch 32, one run.

    .venv/bin/python benchmarks/bench_export.py --n 200                      # random-weight small model
    .venv/bin/python benchmarks/bench_export.py --model-dir models/multi30k-de-en --src valid.de
    .venv/bin/python benchmarks/bench_export.py --providers CUDAExecutionProvider   # adds CUDA fp32/fp16

Rows: torch without cache (``decode_step`` re-run over the whole prefix at every step), torch with the
cache (``TorchStepFunction``), onnxruntime fp32 and int8 on CPU (``OrtStepFunction``), and with the CUDA
provider fp32 and fp16 with IO binding (``IoBindingStepFunction``: K/V stay on the device). Each decodes
every sentence with ``model.search.beam_search`` in length-sorted batches; tokens/s counts generated
tokens (EOS included) over the wall time of encoder, steps and search. "step %" is the share spent inside
the step function, the rest is the numpy search. "same" counts sentences identical to torch with cache.
Without --model-dir a random-weight model of --preset is exported into a temporary directory; random
weights rarely emit EOS, so its outputs are capped at the source length (8-30 tokens, sentence-like)
rather than the paper's source + 50.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from export.calibrate import calibration_feeds
from export.onnx_export import export_variant
from model.config import preset
from model.decode import translate_ids
from model.decoding import PAPER
from model.model_dir import read_model_dir
from model.runtime import IoBindingStepFunction, OrtModel, session_options
from model.search import FullTableStep, StepFunction, StepOutput
from model.signature import VARIANTS
from model.tokenizer import Tokenizer
from model.torch_step import TorchStepFunction
from model.transformer import Transformer
from model.weights import load_model


class FullPrefixStepFunction:
    """torch without a cache: every step re-runs the decoder over all tokens so far and keeps the last."""

    def __init__(self, model: Transformer, src_ids: np.ndarray, src_pad_mask: np.ndarray) -> None:
        self.model = model
        src = torch.from_numpy(src_ids)
        self.base_mask = torch.from_numpy(src_pad_mask)
        with torch.inference_mode():
            self.base_cross = model.cross_kv(model.encode(src, self.base_mask))
        self.row_sentence = np.arange(src_ids.shape[0])
        self.prefix = np.zeros((src_ids.shape[0], 0), dtype=np.int64)  # (N, t) tokens fed so far

    def __call__(self, tokens: np.ndarray, step: int, reorder: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        if reorder is not None:
            self.prefix, self.row_sentence = self.prefix[reorder], self.row_sentence[reorder]
        self.prefix = np.concatenate([self.prefix, tokens[:, None]], axis=1)  # (N, step + 1)
        index = torch.from_numpy(self.row_sentence)
        cross = tuple((k.index_select(0, index), v.index_select(0, index)) for k, v in self.base_cross)
        with torch.inference_mode():
            log_probs, _, attn = self.model.decode_step(
                torch.from_numpy(self.prefix), torch.arange(step + 1), cross, self.base_mask[index], None
            )
        return log_probs[:, -1].numpy(), attn[:, -1].numpy()


def full_prefix_step(model: Transformer, src_ids: np.ndarray, src_pad_mask: np.ndarray) -> StepFunction:
    return FullTableStep(FullPrefixStepFunction(model, src_ids, src_pad_mask), model.config.eos_id)


@dataclass
class Timed:
    """Wraps step-function factories to add up the time spent inside the step functions."""

    seconds: float = 0.0

    def factory(self, make: Callable[[np.ndarray, np.ndarray], StepFunction]) -> Callable:
        def make_timed(src_ids: np.ndarray, src_pad_mask: np.ndarray) -> StepFunction:
            started = time.perf_counter()
            step_fn = make(src_ids, src_pad_mask)  # the encoder runs here
            self.seconds += time.perf_counter() - started

            def timed(tokens: np.ndarray, step: int, reorder: np.ndarray | None, k: int) -> StepOutput:
                started = time.perf_counter()
                out = step_fn(tokens, step, reorder, k)
                self.seconds += time.perf_counter() - started
                return out

            return timed

        return make_timed


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, help="a model directory (default: a random-weight --preset model)")
    parser.add_argument("--preset", default="small", help="preset of the random-weight model")
    parser.add_argument("--vocab", type=int, default=8000, help="vocabulary of the random-weight model")
    parser.add_argument("--src", type=Path, help="source sentences, one per line (needs --model-dir for its spm)")
    parser.add_argument("--n", type=int, default=1000, help="sentences to decode")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--beam-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0, help="torch and onnxruntime intra-op threads (0 = default)")
    parser.add_argument("--providers", nargs="+", default=["CPUExecutionProvider"])
    parser.add_argument(
        "--skip",
        nargs="*",
        default=[],
        choices=["torch-nocache", "torch-cache", "ort-fp32", "ort-int8", "cuda-fp32", "cuda-fp16"],
        help="rows to leave out",
    )
    return parser.parse_args()


def prepare_model(args: argparse.Namespace, work: Path, srcs: list[list[int]]) -> tuple[Transformer, Path]:
    """The model and an onnx/ directory holding the variants this run needs (int8 calibrated on ``srcs``)."""
    if args.model_dir is not None:
        model, _ = load_model(args.model_dir)
    else:
        torch.manual_seed(0)
        model = Transformer(preset(args.preset, args.vocab)).eval()
    onnx_dir = work / "onnx"
    variants = ["fp32", "int8"] + (["fp16"] if "CUDAExecutionProvider" in args.providers else [])
    calibration = None
    for variant in variants:
        if variant == "int8":
            fp32 = OrtModel.from_files(onnx_dir / VARIANTS["fp32"][0], onnx_dir / VARIANTS["fp32"][1], model.config)
            calibration = calibration_feeds(fp32, srcs, PAPER)
        export_variant(model, onnx_dir, variant, calibration)
    return model, onnx_dir


def sources(args: argparse.Namespace, vocab_size: int) -> list[list[int]]:
    if args.src is not None:
        if args.model_dir is None:
            raise SystemExit("--src needs --model-dir (its SentencePiece model tokenizes the text)")
        tokenizer = Tokenizer(args.model_dir / "spm.model")
        lines = args.src.read_text(encoding="utf-8").splitlines()[: args.n]
        return tokenizer.encode_batch(lines)
    rng = np.random.default_rng(0)  # lengths like Multi30k's: 8-30 subwords
    return [[int(t) for t in rng.integers(4, vocab_size, n)] for n in rng.integers(8, 31, args.n)]


def implementations(
    args: argparse.Namespace, model: Transformer, onnx_dir: Path
) -> dict[str, Callable[[np.ndarray, np.ndarray], StepFunction]]:
    """Row label → step-function factory, for the rows not named in --skip."""
    cfg = model.config
    options = session_options(intra_op_threads=args.threads)

    def ort_model(variant: str, providers: list[str]) -> OrtModel:
        enc_file, dec_file, _ = VARIANTS[variant]
        return OrtModel.from_files(onnx_dir / enc_file, onnx_dir / dec_file, cfg, variant, providers, options)

    rows = [
        ("torch-nocache", "torch, no cache", lambda: partial(full_prefix_step, model)),
        ("torch-cache", "torch, cache", lambda: partial(TorchStepFunction, model)),
        ("ort-fp32", "ORT fp32 CPU", lambda: ort_model("fp32", ["CPUExecutionProvider"]).step_function),
        ("ort-int8", "ORT int8 CPU", lambda: ort_model("int8", ["CPUExecutionProvider"]).step_function),
    ]
    if "CUDAExecutionProvider" in args.providers:
        cuda = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        for variant in ("fp32", "fp16"):
            make = partial(lambda v: partial(IoBindingStepFunction, ort_model(v, cuda)), variant)
            rows.append((f"cuda-{variant}", f"ORT {variant} CUDA, IO binding", make))
    return {label: make() for key, label, make in rows if key not in args.skip}


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    search = replace(PAPER, beam_size=args.beam_size)
    if args.model_dir is None:  # random weights rarely emit EOS: stop at the source length instead
        search = replace(search, max_length_offset=0)
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        vocab = read_model_dir(args.model_dir).config.vocab_size if args.model_dir else args.vocab
        srcs = sources(args, vocab)
        model, onnx_dir = prepare_model(args, Path(tmp), srcs)
        cfg = model.config
        rows = implementations(args, model, onnx_dir)
        print(
            f"model: d_model {cfg.d_model}, {cfg.n_encoder_layers}+{cfg.n_decoder_layers} layers, vocab "
            f"{cfg.vocab_size} ({args.model_dir or f'random-weight {args.preset} preset'}) | {len(srcs)} sentences, "
            f"beam {args.beam_size}, batch {args.batch_size} | torch threads {torch.get_num_threads()}, "
            f"onnxruntime {ort.__version__}, torch {torch.__version__} | {platform.processor() or platform.machine()}"
        )
        results = {}
        for name, make in rows.items():
            translate_ids(make, srcs[: args.batch_size], cfg, search, args.batch_size)  # warm-up
            timer = Timed()
            started = time.perf_counter()
            out = translate_ids(timer.factory(make), srcs, cfg, search, args.batch_size)
            seconds = time.perf_counter() - started
            results[name] = (out, sum(len(t) + 1 for t in out), seconds, timer.seconds / seconds)
        print_table(results)


def print_table(results: dict[str, tuple[list[list[int]], int, float, float]]) -> None:
    base_out, base_tokens, base_seconds, _ = results.get("torch, cache", next(iter(results.values())))
    base_rate = base_tokens / base_seconds
    header = f"{'implementation':30} {'tokens':>8} {'seconds':>8} {'tokens/s':>9} {'vs torch+cache':>14}"
    print(f"{header} {'same':>9} {'step %':>7}")
    for name, (out, tokens, seconds, step_share) in results.items():
        same = sum(a == b for a, b in zip(out, base_out, strict=True))
        rate = tokens / seconds
        print(
            f"{name:30} {tokens:>8} {seconds:>8.2f} {rate:>9.0f} {rate / base_rate:>13.2f}x "
            f"{same:>4}/{len(out):<4} {step_share:>6.0%}"
        )


if __name__ == "__main__":
    main()
