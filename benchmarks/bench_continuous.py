"""What continuous batching's rows at different positions cost against a static batch (ORT fp32, CPU, one run).

    .venv/bin/python benchmarks/bench_continuous.py --model-dir models/multi30k-de-en

1. The decoder step alone, N rows: a static batch (every row at position P) against the same rows at
   positions spread over 1..P in the same right-padded cache (each row attends to its own slots only), and
   a static batch at their mean position: what rows at mixed positions cost in one call.
2. End to end, beam 4: the same sentences as static batches of --batch-size in arrival order
   (``beam_search``) and as one continuous batch holding at most --batch-size sentences, admitting the
   next as one retires (``ContinuousBatch``): wall time, decoder calls, rows per call, the host's time per
   call (wall time outside onnxruntime's encoder and decoder runs: the search, the cache bookkeeping, the
   feeds), identical outputs.

Sources are random subword ids (8-30, like Multi30k's lengths) or --src lines; max length = source + 10.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from session_clock import SessionClock

from model.continuous import ContinuousBatch, OrtRowStep
from model.decode import search_batch
from model.decoding import DecodingOptions
from model.runtime import OrtModel, session_options
from model.tokenizer import Tokenizer, pad_sources


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=Path("models/multi30k-de-en"))
    parser.add_argument("--src", type=Path, help="source sentences, one per line (default: random subword ids)")
    parser.add_argument("--n", type=int, default=200, help="sentences to decode end to end")
    parser.add_argument("--rows", type=int, default=32, help="rows of the step micro-benchmark")
    parser.add_argument("--batch-size", type=int, default=8, help="sentences per static batch / live at once")
    parser.add_argument("--repeat", type=int, default=50, help="step calls timed per case")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    return parser.parse_args()


def time_step(model: OrtModel, positions: np.ndarray, repeat: int) -> float:
    """Median ms of one decoder call, row i at ``positions[i]`` (its past in the first slots of the cache)."""
    cfg, rng = model.config, np.random.default_rng(0)
    n, src_len = positions.size, 20
    feeds = {
        "tokens": rng.integers(4, cfg.vocab_size, (n, 1)),
        "positions": positions[:, None].astype(np.int64),
        "top_k": np.zeros(11, dtype=np.int64),
        "src_pad_mask": np.zeros((n, src_len), dtype=bool),
    }
    kv = (n, cfg.n_heads, int(positions.max()) + 1, cfg.head_dim)  # room for each row's next slot
    past = [rng.standard_normal(kv).astype(np.float32) for _ in model.past_names]
    cross = (n, cfg.n_heads, src_len, cfg.head_dim)
    cross_kv = [rng.standard_normal(cross).astype(np.float32) for _ in model.cross_names]
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        model.run_step(dict(feeds), past, cross_kv)
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def step_costs(model: OrtModel, rows: int, repeat: int) -> None:
    print(f"decoder step, {rows} rows, median ms per call")
    print(f"{'P':>4} {'static P':>9} {'spread 1..P':>12} {'vs static P':>12} {'static mean':>12} {'vs mean':>8}")
    for past in (8, 16, 32, 64):
        spread = np.linspace(1, past, rows).round().astype(np.int64)
        static = time_step(model, np.full(rows, past), repeat)
        mixed = time_step(model, spread, repeat)
        mean = time_step(model, np.full(rows, int(spread.mean().round())), repeat)
        print(f"{past:>4} {static:>9.3f} {mixed:>12.3f} {mixed / static:>11.2f}x {mean:>12.3f} {mixed / mean:>7.2f}x")


def end_to_end(model: OrtModel, sources: list[list[int]], batch_size: int) -> None:
    cfg, options = model.config, DecodingOptions(beam_size=4, max_length_offset=10)
    calls = {"static": 0, "continuous": 0}
    rows = {"static": 0, "continuous": 0}
    clock = SessionClock(model)

    start = time.perf_counter()
    static: list[list[int]] = []
    for i in range(0, len(sources), batch_size):
        chunk = sources[i : i + batch_size]
        src_ids, src_mask = pad_sources(chunk, max_len=cfg.max_positions)
        step = model.step_function(src_ids, src_mask)

        def counted(tokens, position, reorder, k, step=step):
            calls["static"] += 1
            rows["static"] += tokens.size
            return step(tokens, position, reorder, k)

        lengths = (~src_mask).sum(axis=1) - 1
        static += [hyps[0].tokens for hyps in search_batch(counted, lengths, cfg, options)]
    static_s = time.perf_counter() - start
    static_ort, clock.seconds = clock.seconds, 0.0

    start = time.perf_counter()
    batch = ContinuousBatch(OrtRowStep(model), cfg)
    waiting, done = list(range(len(sources))), {}
    while waiting or not batch.idle:
        while waiting and batch.live_sentences + len(batch.pending) < batch_size:
            i = waiting.pop(0)
            batch.admit(i, sources[i], options)
        rows["continuous"] += batch.live_rows + len(batch.pending)  # this call's rows
        calls["continuous"] += 1
        for key, hyps in batch.step():
            done[key] = hyps[0].tokens
    continuous_s = time.perf_counter() - start
    host = {"static": static_s - static_ort, "continuous": continuous_s - clock.seconds}

    same = sum(done[i] == tokens for i, tokens in enumerate(static))
    print(f"\nend to end: {len(sources)} sentences, beam 4, {batch_size} sentences per static batch / live at once")
    for name, seconds in (("static", static_s), ("continuous", continuous_s)):
        per_call = 1000 * host[name] / calls[name]
        print(
            f"{name:>10}: {seconds:6.2f} s  {calls[name]:5d} calls  {rows[name] / calls[name]:5.1f} rows/call  "
            f"host {per_call:.3f} ms/call outside onnxruntime"
        )
    print(f"continuous / static wall time: {continuous_s / static_s:.2f}x; identical outputs {same}/{len(sources)}")


def main() -> None:
    args = parse_args()
    model = OrtModel.load(args.model_dir, "fp32", options=session_options(intra_op_threads=args.threads))
    if args.src is not None:
        lines = args.src.read_text(encoding="utf-8").splitlines()[: args.n]
        sources = Tokenizer(args.model_dir / "spm.model").encode_batch(lines)
    else:
        rng = np.random.default_rng(0)
        sources = [[int(t) for t in rng.integers(4, model.config.vocab_size, n)] for n in rng.integers(8, 31, args.n)]
    print(f"model {args.model_dir}, ORT fp32 CPU, {args.threads} intra-op thread(s)")
    step_costs(model, args.rows, args.repeat)
    end_to_end(model, sources, args.batch_size)


if __name__ == "__main__":
    main()
