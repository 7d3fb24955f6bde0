"""Training throughput (target tokens per second) of a model preset on this machine, with synthetic batches.

    .venv/bin/python benchmarks/bench_train.py --preset small --batch-tokens 4096 --steps 20 [--amp bf16]

Each step is a full optimizer step (forward, label-smoothed loss, backward, Adam) on a batch of random
token ids shaped like Multi30k (sentence lengths 8-30). The first steps are warm-up and not timed. ``--amp bf16``
runs the forward under bf16 autocast, as ``train.amp: bf16`` does (on CPU too).
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import time

import torch

from model.config import preset
from model.transformer import Transformer, count_parameters
from training.loss import label_smoothed_nll_loss


def make_batch(batch_tokens: int, vocab: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    length = 30
    n = max(batch_tokens // length, 1)
    src = torch.randint(4, vocab, (n, length), generator=gen)
    tgt = torch.randint(4, vocab, (n, length + 1), generator=gen)
    src_lens = torch.randint(8, length + 1, (n,), generator=gen)
    src_pad_mask = torch.arange(length)[None, :] >= src_lens[:, None]
    tgt_pad = torch.arange(length + 1)[None, :] >= (src_lens[:, None] + 1)
    tgt = tgt.masked_fill(tgt_pad, 0)
    return src.masked_fill(src_pad_mask, 0), src_pad_mask, tgt[:, :-1], tgt[:, 1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--amp", default="none", choices=["none", "bf16"], help="bf16: autocast, as train.amp=bf16")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = Transformer(preset(args.preset, args.vocab)).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-9)
    gen = torch.Generator().manual_seed(0)
    tokens, seconds = 0, 0.0
    for step in range(args.warmup + args.steps):
        src, mask, tgt_in, tgt_out = make_batch(args.batch_tokens, args.vocab, gen)
        started = time.perf_counter()
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if args.amp == "bf16" else contextlib.nullcontext()
        with autocast:
            loss, _ = label_smoothed_nll_loss(model(src, mask, tgt_in), tgt_out, 0.1, 0)
        n_tokens = int(tgt_out.ne(0).sum())
        optimizer.zero_grad()
        (loss / n_tokens).backward()
        optimizer.step()
        if step >= args.warmup:
            seconds += time.perf_counter() - started
            tokens += n_tokens
    print(f"machine: {platform.machine()} {platform.processor() or ''}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print(f"preset {args.preset}: {count_parameters(model) / 1e6:.1f}M parameters, vocab {args.vocab}, "
          f"batch ~{args.batch_tokens} tokens, {args.steps} timed steps, amp {args.amp}")  # fmt: skip
    print(f"training throughput: {tokens / seconds:,.0f} target tokens/s ({seconds / args.steps:.3f} s/step)")


if __name__ == "__main__":
    main()
