"""The training loop: token-budget batches, label smoothing, the paper's Adam schedule, exact resume.

Resume is exact because every source of change lives in the checkpoint: weights, optimizer moments,
step, the data position (epoch, batch index; the batch order of an epoch is a function of seed and
epoch), the RNG states, and the AMP scaler. Killing a run and resuming it gives the same weights, bit for
bit on CPU, as a run that was never interrupted.
"""

from __future__ import annotations

import logging
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from model.config import ModelConfig
from model.decode import score_translations
from model.decoding import DecodingOptions
from model.tokenizer import Tokenizer
from model.transformer import Transformer, count_parameters
from training import data as data_lib
from training import finalize as finalize_lib
from training.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from training.config import TrainConfig
from training.distributed import DistInfo, all_reduce_sum, barrier, init_distributed
from training.evaluate import translate_texts, validation_loss
from training.loss import label_smoothed_nll_loss, r_drop_kl
from training.metrics import MetricsLog
from training.schedule import cooldown_factor, noam_lr
from training.spm import train_spm
from training.subword import sample_dataset

log = logging.getLogger(__name__)


# What a finished or started run leaves in its output dir (besides checkpoints/); --force deletes them.
RUN_FILES = ("model.json", "weights.safetensors", "metrics.jsonl", "training_curves.png", "spm.model", "spm.vocab")


# The tokenizer settings that decide spm.model: a resumed run must keep them (sampling may change).
TOKENIZER_KEYS = ("vocab_size", "model", "model_type", "character_coverage", "input_sentence_size")


class TrainingError(RuntimeError):
    """A run that cannot start or continue as asked; the message says what to do."""


@dataclass
class Progress:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    tokens_seen: int = 0
    train_seconds: float = 0.0
    best_bleu: float = -1.0
    best_step: int = 0


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("train.device is 'cuda' but no CUDA device is visible; use --set train.device=cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def _native_cpu_bf16() -> bool:
    """Whether oneDNN runs bf16 natively on this CPU (a private torch check: False where it is missing)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def pick_amp(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: on CUDA bf16 where supported (else fp16) for "auto"; on CPU fp32 unless "bf16" is asked
    (it needs a CPU with native bf16, e.g. AVX512-BF16 or AMX: ~1.5x the fp32 steps per second of mt-train on the
    2-core AVX512-BF16 dev box; elsewhere it is emulated and slower). fp16 on CPU is ignored (no fast kernels)."""
    if device.type == "cpu":
        if name == "bf16":
            if not _native_cpu_bf16():
                log.warning("train.amp=bf16 on a CPU without native bf16: expect it slower than fp32")
            return torch.bfloat16
        if name == "fp16":
            log.warning("train.amp=fp16 ignored on CPU (no fast fp16 kernels there): use bf16 or none")
        return None
    if device.type != "cuda":
        if name in ("bf16", "fp16"):
            log.warning("train.amp=%s ignored on %s: mixed precision is used on CUDA and CPU only", name, device)
        return None
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


class Trainer:
    """One training run: ``prepare()`` (every check before any training), ``run()`` (the loop), ``finalize()``
    (the model dir)."""

    def __init__(self, cfg: TrainConfig, resume: bool = False, force: bool = False) -> None:
        """Only settles where and how to run; ``prepare()`` does the work (data, tokenizer, network)."""
        self.cfg, self.resume, self.force = cfg, resume, force
        self.out = Path(cfg.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        self.device = pick_device(cfg.train.device)
        self.dist: DistInfo = init_distributed(self.device.type)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)
        self.amp_dtype = pick_amp(cfg.train.amp, self.device)
        self.resume_from: Path | None = None
        self.progress = Progress()
        self._sampled: tuple[int, data_lib.ParallelDataset] | None = None

    def prepare(self) -> Trainer:
        """Check the output dir, read and encode the data (training SentencePiece if needed), build the
        network and optimiser, and load the checkpoint when resuming; every check runs before training."""
        cfg = self.cfg
        self.resume_from = self._check_output_dir(self.resume, self.force)
        self.train_pairs, self.valid_pairs = data_lib.check_data(cfg.data)
        self.tokenizer = self._prepare_tokenizer()
        self.model_config: ModelConfig = cfg.model.build(self.tokenizer.vocab_size)
        self.train_set = data_lib.encode_dataset(
            self.tokenizer, *self.train_pairs, cfg.data.max_len, cfg.data.max_len_ratio, filter_long=True
        )
        self.valid_set = data_lib.encode_dataset(
            self.tokenizer, *self.valid_pairs, self.model_config.max_positions - 1, filter_long=False
        )
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.model = Transformer(self.model_config).to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=0.0, betas=(0.9, 0.98), eps=1e-9)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        if self.resume_from is not None:
            self._load(self.resume_from)
        self.ddp_model = (
            DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            if self.dist.enabled
            else self.model
        )
        self.metrics = MetricsLog(self.out / "metrics.jsonl", self.progress.step if self.resume_from else None)
        return self

    # -- setup -----------------------------------------------------------------------------------------
    def _check_output_dir(self, resume: bool, force: bool) -> Path | None:
        """The checkpoint to resume from, if any; refuses to start over another run's files unless forced."""
        latest = latest_checkpoint(self.ckpt_dir)
        if resume:
            if latest is None:
                raise TrainingError(f"--resume: no checkpoint in {self.ckpt_dir}; start without --resume")
            return latest
        found = [p.name for p in (self.ckpt_dir, *(self.out / n for n in RUN_FILES)) if p.exists()]
        if found and not force:
            what = f"checkpoints ({latest.name})" if latest else "a model"
            raise TrainingError(
                f"{self.out} already holds {what} of another run ({', '.join(found)}); pass --resume to continue "
                "that run, choose another output_dir, or pass --force to delete it and start over"
            )
        if found and self.dist.is_main:
            log.warning("--force: deleting %s in %s", ", ".join(found), self.out)
            shutil.rmtree(self.ckpt_dir, ignore_errors=True)
            for name in RUN_FILES:
                (self.out / name).unlink(missing_ok=True)
        return None

    def _prepare_tokenizer(self) -> Tokenizer:
        target = self.out / "spm.model"
        given = self.cfg.tokenizer.model
        if self.dist.is_main and not target.exists():
            self.out.mkdir(parents=True, exist_ok=True)
            if given is not None:
                shutil.copyfile(given, target)
            else:
                t = self.cfg.tokenizer
                train_spm(
                    [*self.train_pairs[0], *self.train_pairs[1]],
                    self.out / "spm",
                    vocab_size=t.vocab_size,
                    model_type=t.model_type,
                    character_coverage=t.character_coverage,
                    input_sentence_size=t.input_sentence_size,
                    seed=self.cfg.seed,
                )
        barrier(self.dist)
        return Tokenizer(target)

    def _load(self, path: Path) -> None:
        state = load_checkpoint(path)
        if state["model_config"] != self.model_config.to_dict():
            raise TrainingError(
                f"{path} was trained with a different model config; resume with the config it was started with"
            )
        started = state["train_config"]["tokenizer"]
        changed = [
            f"tokenizer.{k}={started.get(k)!r}"
            for k in TOKENIZER_KEYS
            if started.get(k) != getattr(self.cfg.tokenizer, k)
        ]
        if changed:
            raise TrainingError(
                f"{path} was trained with other tokenizer settings ({', '.join(changed)}); resume with the "
                "settings it was started with, or start over in another output_dir"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.progress = Progress(**state["progress"])
        set_rng_state(state["rng"])
        log.info("resumed from %s at step %d", path, self.progress.step)

    # -- the loop --------------------------------------------------------------------------------------
    def epoch_dataset(self, epoch: int) -> data_lib.ParallelDataset:
        """The training pairs as epoch ``epoch`` sees them: the best segmentation, or with subword
        regularisation on, that epoch's sample (made once per epoch, reproducible on resume)."""
        t = self.cfg.tokenizer
        if t.sampling_alpha <= 0:
            return self.train_set
        if self._sampled is None or self._sampled[0] != epoch:
            sampled = sample_dataset(
                self.tokenizer.sp, self.train_pairs, self.train_set, t.sampling_alpha, t.sampling_nbest,
                self.cfg.data.max_len, self.cfg.seed, epoch,
            )  # fmt: skip
            self._sampled = (epoch, sampled)
        return self._sampled[1]

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        dataset = self.epoch_dataset(epoch)
        batches = data_lib.make_batches(
            dataset.src_lens, dataset.tgt_lens, self.cfg.train.batch_tokens, self.cfg.seed, epoch
        )
        return data_lib.shard(batches, self.dist.rank, self.dist.world_size)

    def run(self) -> Path:
        cfg, p = self.cfg.train, self.progress
        if p.step >= cfg.max_steps:
            log.info("already at step %d >= train.max_steps %d: nothing to train", p.step, cfg.max_steps)
        bar = tqdm(
            total=cfg.max_steps,
            initial=p.step,
            disable=None if self.dist.is_main else True,
            desc="train",
            dynamic_ncols=True,
        )
        self.model.train()
        window_loss, window_tokens, window_start = 0.0, 0, time.perf_counter()
        batches = self.epoch_batches(p.epoch)
        while p.step < cfg.max_steps:
            if p.batch_in_epoch >= len(batches):
                p.epoch, p.batch_in_epoch = p.epoch + 1, 0
                batches = self.epoch_batches(p.epoch)
            group = batches[p.batch_in_epoch : p.batch_in_epoch + cfg.accum_steps]
            started = time.perf_counter()
            loss_sum, n_tokens = self.train_step(group)
            p.train_seconds += time.perf_counter() - started
            p.batch_in_epoch += len(group)
            p.step += 1
            p.tokens_seen += n_tokens
            window_loss += loss_sum
            window_tokens += n_tokens
            bar.update(1)
            if p.step % cfg.log_every == 0 or p.step == cfg.max_steps:
                elapsed = time.perf_counter() - window_start
                record = {
                    "kind": "train",
                    "step": p.step,
                    "epoch": p.epoch,
                    "loss": window_loss / max(window_tokens, 1),
                    "lr": self.optimizer.param_groups[0]["lr"],
                    "tokens_per_s": window_tokens / max(elapsed, 1e-9),
                }
                if self.dist.is_main:
                    self.metrics.write(record)
                bar.set_postfix(
                    loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}"
                )
                window_loss, window_tokens, window_start = 0.0, 0, time.perf_counter()
            if p.step % cfg.eval_every == 0 or p.step == cfg.max_steps:
                self.evaluate_and_save()
            elif cfg.save_every and p.step % cfg.save_every == 0:
                self.save()
        bar.close()
        return self.out

    def train_step(self, group: list[np.ndarray]) -> tuple[float, int]:
        """One optimizer step over ``group`` (gradient accumulation); returns (loss sum, target tokens)."""
        cfg = self.cfg.train
        step = self.progress.step + 1
        lr = noam_lr(step, self.model_config.d_model, cfg.warmup_steps, cfg.lr_scale)
        lr *= cooldown_factor(step, cfg.max_steps, cfg.cooldown)
        for param_group in self.optimizer.param_groups:
            param_group["lr"] = lr
        dataset = self.epoch_dataset(self.progress.epoch)
        batches = [data_lib.collate(dataset, idx) for idx in group]
        local_tokens = sum(b.n_tgt_tokens for b in batches)
        # Normalise by every rank's tokens: DDP averages gradients over ranks, so scale back by world size.
        total_tokens = all_reduce_sum(float(local_tokens), self.dist, self.device)
        scale = self.dist.world_size / max(total_tokens, 1.0)
        self.optimizer.zero_grad(set_to_none=True)
        loss_total = 0.0
        for i, batch in enumerate(batches):
            sync = i == len(batches) - 1
            ctx = self.ddp_model.no_sync() if (self.dist.enabled and not sync) else nullcontext()
            with ctx, self._autocast():
                loss = self._batch_loss(batch)
            self.scaler.scale(loss * scale).backward()
            loss_total += loss.item()
        if cfg.clip_norm > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss_total, local_tokens

    def _batch_loss(self, batch: data_lib.Batch) -> torch.Tensor:
        """The label-smoothed loss sum of one batch; with R-Drop, the mean over two dropout passes plus
        ``r_drop_alpha`` times their symmetric KL (the two passes run as one batch of twice the rows)."""
        cfg, pad = self.cfg.train, self.model_config.pad_id
        src, src_mask, tgt_in = (t.to(self.device) for t in (batch.src, batch.src_pad_mask, batch.tgt_in))
        target = batch.tgt_out.to(self.device)
        if cfg.r_drop_alpha <= 0:
            logits = self.ddp_model(src, src_mask, tgt_in)
            return label_smoothed_nll_loss(logits, target, cfg.label_smoothing, pad)[0]
        logits = self.ddp_model(src.repeat(2, 1), src_mask.repeat(2, 1), tgt_in.repeat(2, 1))  # (2B, T, V)
        first, second = logits.chunk(2)
        both = label_smoothed_nll_loss(logits, target.repeat(2, 1), cfg.label_smoothing, pad)[0]
        return 0.5 * both + cfg.r_drop_alpha * r_drop_kl(first, second, target, pad)

    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # -- evaluation and checkpoints ---------------------------------------------------------------------
    def search_config(self) -> DecodingOptions:
        e = self.cfg.eval
        return DecodingOptions(beam_size=e.beam_size, length_penalty=e.length_penalty)

    def validate(self, model: Transformer) -> dict[str, Any]:
        """Validation loss (teacher forced) and BLEU/chrF of beam-search translations of the valid set."""
        batches = data_lib.make_batches(
            self.valid_set.src_lens, self.valid_set.tgt_lens, self.cfg.train.batch_tokens, 0, 0
        )
        collated = (data_lib.collate(self.valid_set, idx) for idx in batches)
        result: dict[str, Any] = validation_loss(model, collated, self.device, self.cfg.train.label_smoothing)
        n = self.cfg.eval.max_sentences or len(self.valid_pairs[0])
        sources, references = self.valid_pairs[0][:n], self.valid_pairs[1][:n]
        was_training = model.training
        model.eval()
        hyps = translate_texts(model, self.tokenizer, sources, self.search_config(), self.cfg.eval.batch_size)
        model.train(was_training)
        result.update(score_translations(hyps, references))
        result["sentences"] = len(sources)
        return result

    def evaluate_and_save(self) -> None:
        p = self.progress
        if self.dist.is_main:
            started = time.perf_counter()
            result = self.validate(self.model)
            log.info(
                "step %d: valid loss %.3f ppl %.2f BLEU %.2f chrF %.2f (%.0fs)",
                p.step, result["loss"], result["ppl"], result["bleu"], result["chrf"], time.perf_counter() - started,
            )  # fmt: skip
            self.metrics.write({"kind": "valid", "step": p.step, **result})
            is_best = result["bleu"] > p.best_bleu
            if is_best:
                p.best_bleu, p.best_step = result["bleu"], p.step
            self.save(is_best)
        barrier(self.dist)

    def save(self, is_best: bool = False) -> None:
        """A step checkpoint (and ``best.pt``), keeping the last ``train.keep_last``; rank 0 only."""
        if not self.dist.is_main:
            return
        state = self.checkpoint_state()
        save_checkpoint(state, self.ckpt_dir / f"step_{self.progress.step:07d}.pt")
        if is_best:
            save_checkpoint(state, self.ckpt_dir / "best.pt")
        prune_checkpoints(self.ckpt_dir, self.cfg.train.keep_last)

    def checkpoint_state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "progress": vars(self.progress).copy(),
            "rng": rng_state(),
            "model_config": self.model_config.to_dict(),
            "train_config": self.cfg.to_dict(),
        }

    def summary(self) -> dict[str, Any]:
        p = self.progress
        return {
            "steps": p.step,
            "epochs": round(p.epoch + p.batch_in_epoch / max(len(self.epoch_batches(p.epoch)), 1), 2),
            "tokens_seen": p.tokens_seen,
            "train_seconds": round(p.train_seconds, 1),
            "parameters": count_parameters(self.model),
            "world_size": self.dist.world_size,
            "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            "torch_threads": torch.get_num_threads(),
            "amp": str(self.amp_dtype).removeprefix("torch.") if self.amp_dtype else "none",
            "train_pairs": len(self.train_set.src_lens),
            "best_step": p.best_step,
            "config": self.cfg.to_dict(),
        }

    def finalize(self) -> Path:
        """Write ``weights.safetensors`` and ``model.json``: the average of the last ``train.average_last``
        checkpoints or the best one, whichever scores higher on validation (rank 0 only)."""
        candidates = finalize_lib.candidate_weights(self.ckpt_dir, self.cfg.train.average_last, self.progress.best_step)
        model = Transformer(self.model_config).to(self.device)
        scored = []
        for name, state in candidates.items():
            model.load_state_dict(state)
            result = self.validate(model)
            log.info("%s: valid BLEU %.2f chrF %.2f", name, result["bleu"], result["chrf"])
            scored.append((name, state, result))
        name, state, result = max(scored, key=lambda item: item[2]["bleu"])
        model.load_state_dict(state)
        return finalize_lib.write_model_dir(
            self.out, model, self.cfg, self.summary(), chosen=name, result=result,
            candidates={n: {"bleu": r["bleu"], "chrf": r["chrf"]} for n, _, r in scored},
        )  # fmt: skip
