"""mt-train end to end: a tiny model learns the copy task, exact resume after a kill, averaging, DDP, errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import make_parallel, run_overrides, toy_pairs

from model.decoding import DecodingOptions
from model.tokenizer import Tokenizer
from model.weights import load_model
from training.checkpoint import average_state_dicts, load_checkpoint, save_checkpoint, step_checkpoints
from training.cli import main as mt_train
from training.evaluate import translate_texts
from training.loss import label_smoothed_nll_loss, r_drop_kl
from training.schedule import cooldown_factor, noam_lr
from training.trainer import pick_amp

CONFIG = str(Path(__file__).parents[2] / "training" / "configs" / "multi30k_de_en.yaml")


def read_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def toy_args(data_dir: Path, out: Path, *extra: str) -> list[str]:
    settings = run_overrides(
        data_dir,
        out,
        tokenizer__vocab_size=40,
        train__batch_tokens=256,
        train__warmup_steps=10,
        train__eval_every=10,
        train__log_every=5,
        train__keep_last=3,
        eval__max_sentences=5,
    )
    return ["--config", CONFIG, *[a for s in [*settings, *extra] for a in ("--set", s)]]


@pytest.fixture
def toy_dir(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    make_parallel(data, toy_pairs(300, "reverse", seed=0), split="train")
    make_parallel(data, toy_pairs(20, "reverse", seed=1), split="valid")
    return data


def test_tiny_model_learns_the_copy_task_exactly(trained_model_dir: Path, copy_task_dir: Path) -> None:
    model, info = load_model(trained_model_dir)
    tokenizer = Tokenizer(info.tokenizer_file)
    sources = read_lines(copy_task_dir / "test.src")  # held out: never seen in training or validation
    outputs = translate_texts(model, tokenizer, sources, DecodingOptions(beam_size=4))
    assert outputs == read_lines(copy_task_dir / "test.tgt")
    greedy = translate_texts(model, tokenizer, sources, DecodingOptions(beam_size=1))
    assert greedy == read_lines(copy_task_dir / "test.tgt")


def test_model_dir_records_config_scores_and_curves(trained_model_dir: Path) -> None:
    meta = json.loads((trained_model_dir / "model.json").read_text())
    assert meta["model"]["d_model"] == 32 and meta["source_lang"] == "src" and meta["target_lang"] == "tgt"
    valid = meta["eval"]["valid"]
    assert valid["bleu"] == 100.0 and valid["sentences"] == 50
    assert valid["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")
    assert meta["training"]["steps"] == 2000 and meta["training"]["parameters"] > 0
    assert meta["decoding"] == {"beam_size": 2, "length_penalty": 0.6, "max_length_offset": 50}
    records = [json.loads(line) for line in (trained_model_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "valid"] == [500, 1000, 1500, 2000]
    assert (trained_model_dir / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {p.name for p in (trained_model_dir / "checkpoints").iterdir()} == {
        "best.pt",
        "step_0001500.pt",
        "step_0002000.pt",
    }


def test_resume_continues_and_says_so(toy_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    assert mt_train(toy_args(toy_dir, out, "train.max_steps=10")) == 0
    assert mt_train(toy_args(toy_dir, out, "train.max_steps=20") + ["--resume"]) == 0
    err = capsys.readouterr().err
    assert "resumed from" in err and "at step 10" in err
    meta = json.loads((out / "model.json").read_text())
    assert meta["training"]["steps"] == 20


def assert_same_training_state(a: Path, b: Path) -> None:
    sa, sb = load_checkpoint(a), load_checkpoint(b)
    for key, value in sa["model"].items():
        assert torch.equal(value, sb["model"][key]), key
    for i, state in sa["optimizer"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[name], sb["optimizer"]["state"][i][name]), (i, name)
    assert sa["progress"]["step"] == sb["progress"]["step"]
    assert sa["progress"]["tokens_seen"] == sb["progress"]["tokens_seen"]


# Dropout and subword sampling on: both draw randomness that resume must restore exactly.
SAMPLED = ("model.dropout=0.3", "tokenizer.sampling_alpha=0.3", "tokenizer.sampling_nbest=16")


def test_resume_after_a_kill_is_bit_exact(toy_dir: Path, tmp_path: Path) -> None:
    """A run killed with SIGKILL and resumed ends with the same weights and Adam moments, bit for bit,
    across epoch boundaries, each of which draws a new subword sample."""
    straight = tmp_path / "straight"
    assert mt_train(toy_args(toy_dir, straight, "train.max_steps=40", *SAMPLED)) == 0

    killed = tmp_path / "killed"
    args = toy_args(toy_dir, killed, "train.max_steps=100000", *SAMPLED)
    proc = subprocess.Popen([sys.executable, "-m", "training.cli", *args], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (killed / "checkpoints" / "step_0000020.pt").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the run never reached step 20"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    resumed_from = max(step for step, _ in step_checkpoints(killed / "checkpoints"))
    assert 20 <= resumed_from < 40
    assert mt_train(toy_args(toy_dir, killed, "train.max_steps=40", *SAMPLED) + ["--resume"]) == 0
    assert_same_training_state(straight / "checkpoints" / "step_0000040.pt", killed / "checkpoints" / "step_0000040.pt")
    for name in ("weights.safetensors",):
        assert (straight / name).read_bytes() == (killed / name).read_bytes()


def test_refuses_to_clobber_a_run_or_resume_nothing(toy_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert mt_train(toy_args(toy_dir, out, "train.max_steps=10")) == 0
    assert mt_train(toy_args(toy_dir, out, "train.max_steps=10")) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert mt_train(toy_args(toy_dir, tmp_path / "fresh", "train.max_steps=10") + ["--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_a_finished_model_is_overwritten_only_with_force(toy_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert mt_train(toy_args(toy_dir, out, "train.max_steps=10", "train.eval_every=10")) == 0
    shutil.rmtree(out / "checkpoints")  # a model dir as it is shipped: model.json, weights, spm.model
    before = (out / "weights.safetensors").read_bytes()
    assert mt_train(toy_args(toy_dir, out, "train.max_steps=10", "tokenizer.vocab_size=30")) == 2
    err = capsys.readouterr().err
    assert "already holds a model" in err and "--force" in err
    assert (out / "weights.safetensors").read_bytes() == before
    assert mt_train(toy_args(toy_dir, out, "train.max_steps=10", "tokenizer.vocab_size=30") + ["--force"]) == 0
    # The tokenizer was trained again with the vocabulary asked for, not silently reused.
    assert (
        json.loads((out / "model.json").read_text())["model"]["vocab_size"] == Tokenizer(out / "spm.model").vocab_size
    )
    assert Tokenizer(out / "spm.model").vocab_size <= 30


def test_a_leftover_tokenizer_with_other_settings_is_refused(toy_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert mt_train(toy_args(toy_dir, out, "train.max_steps=10")) == 0
    assert mt_train(toy_args(toy_dir, out, "train.max_steps=20", "tokenizer.vocab_size=30") + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert "was trained with other tokenizer settings (tokenizer.vocab_size=40)" in err


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("mismatch", "differ"),
        ("empty", "empty"),
        ("missing", "valid"),
    ],
)
def test_bad_data_fails_before_training(tmp_path: Path, setup: str, message: str, capsys) -> None:
    data = tmp_path / "data"
    data.mkdir()
    make_parallel(data, toy_pairs(30, seed=0), split="train")
    make_parallel(data, toy_pairs(5, seed=1), split="valid")
    if setup == "mismatch":
        (data / "train.tgt").write_text("only one line\n")
    elif setup == "empty":
        (data / "train.src").write_text("")
        (data / "train.tgt").write_text("")
    else:
        (data / "valid.src").unlink()
    assert mt_train(toy_args(data, tmp_path / "out", "train.max_steps=5")) == 2
    err = capsys.readouterr().err
    assert message in err.lower()
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_bad_config_fails_fast_with_every_problem(tmp_path: Path, capsys) -> None:
    args = toy_args(tmp_path, tmp_path / "out", "model.n_heads=3", "train.max_stepz=5")
    assert mt_train(args) == 2
    err = capsys.readouterr().err
    assert "n_heads (3) must divide d_model (32)" in err
    assert "unknown key 'train.max_stepz'; did you mean 'train.max_steps'?" in err


def test_checkpoint_average_is_the_elementwise_mean(tmp_path: Path) -> None:
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0])}
    b = {"w": torch.tensor([3.0, 6.0]), "b": torch.tensor([1.0])}
    save_checkpoint({"model": a}, tmp_path / "step_0000001.pt")
    save_checkpoint({"model": b}, tmp_path / "step_0000002.pt")
    avg = average_state_dicts([tmp_path / "step_0000001.pt", tmp_path / "step_0000002.pt"])
    assert torch.equal(avg["w"], torch.tensor([2.0, 4.0])) and torch.equal(avg["b"], torch.tensor([0.5]))
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary files


def test_label_smoothed_loss_matches_torch_cross_entropy() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g)
    target = torch.randint(1, 11, (2, 5), generator=g)
    target[1, 3:] = 0
    loss, nll = label_smoothed_nll_loss(logits, target, 0.1, pad_id=0)
    ref = torch.nn.functional.cross_entropy(
        logits.reshape(-1, 11), target.reshape(-1), ignore_index=0, label_smoothing=0.1, reduction="sum"
    )
    ref_nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, 11), target.reshape(-1), ignore_index=0, reduction="sum"
    )
    assert torch.allclose(loss, ref, atol=1e-5) and torch.allclose(nll, ref_nll, atol=1e-5)


def test_noam_schedule_peaks_at_warmup() -> None:
    lrs = [noam_lr(s, 512, 4000) for s in range(1, 20001)]
    assert max(range(len(lrs)), key=lrs.__getitem__) + 1 == 4000
    assert noam_lr(4000, 512, 4000) == pytest.approx(512**-0.5 * 4000**-0.5)
    assert noam_lr(16000, 512, 4000, scale=2.0) == pytest.approx(2 * 512**-0.5 * 16000**-0.5)


def test_cooldown_scales_the_last_steps_down_linearly() -> None:
    assert [cooldown_factor(s, 20, 0.0) for s in (1, 20)] == [1.0, 1.0]
    factors = [cooldown_factor(s, 20, 0.2) for s in range(1, 21)]  # the last 4 steps
    assert factors == [1.0] * 16 + [1.0, 0.75, 0.5, 0.25]


def test_a_run_with_cooldown_logs_the_scaled_rate(toy_dir: Path, tmp_path: Path) -> None:
    """The trainer applies the cooldown: the logged rate is the paper's times the linear factor, and equals
    the paper's before the cooldown starts."""
    out = tmp_path / "run"
    assert mt_train(toy_args(toy_dir, out, "train.max_steps=20", "train.cooldown=0.5")) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["lr"] for r in records if r["kind"] == "train"}
    assert sorted(logged) == [5, 10, 15, 20]
    d_model = json.loads((out / "model.json").read_text())["model"]["d_model"]
    scale = logged[5] / noam_lr(5, d_model, 10)  # the config's lr_scale: no cooldown yet at step 5
    assert logged[10] == pytest.approx(scale * noam_lr(10, d_model, 10))
    assert logged[15] == pytest.approx(scale * noam_lr(15, d_model, 10) * 0.6)  # (20 - 15 + 1) / 10
    assert logged[20] == pytest.approx(scale * noam_lr(20, d_model, 10) * 0.1)


def test_pick_amp_on_cpu_is_fp32_unless_bf16_is_asked() -> None:
    cpu = torch.device("cpu")
    assert [pick_amp(name, cpu) for name in ("auto", "none", "fp16", "bf16")] == [None, None, None, torch.bfloat16]


def test_bf16_autocast_trains_on_cpu(toy_dir: Path, tmp_path: Path) -> None:
    """train.amp=bf16 on CPU runs the forward in bf16 (the weights come out different from the fp32 run of the
    same seed), keeps fp32 master weights, learns, and says so in model.json."""
    runs = {}
    for amp in ("none", "bf16"):
        out = tmp_path / amp
        assert mt_train(toy_args(toy_dir, out, "train.max_steps=30", f"train.amp={amp}")) == 0
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses = [r["loss"] for r in records if r["kind"] == "train"]
        assert losses[-1] < 0.9 * losses[0]
        meta = json.loads((out / "model.json").read_text())["training"]
        runs[amp] = (meta["amp"], load_model(out)[0], losses[-1])
    assert runs["none"][0] == "none" and runs["bf16"][0] == "bfloat16"
    assert runs["bf16"][2] == pytest.approx(runs["none"][2], rel=0.05)  # bf16 learns as fp32 does
    fp32, bf16 = runs["none"][1].state_dict(), runs["bf16"][1].state_dict()
    assert all(v.dtype == torch.float32 for v in bf16.values())
    assert any(not torch.equal(fp32[k], bf16[k]) for k in fp32)


def test_a_bf16_run_resumes_bit_exact(toy_dir: Path, tmp_path: Path) -> None:
    """Stopped at step 20 and resumed, a bf16 run on CPU ends where the straight run does, bit for bit."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert mt_train(toy_args(toy_dir, straight, "train.max_steps=40", "train.amp=bf16", *SAMPLED)) == 0
    assert mt_train(toy_args(toy_dir, resumed, "train.max_steps=20", "train.amp=bf16", *SAMPLED)) == 0
    assert mt_train(toy_args(toy_dir, resumed, "train.max_steps=40", "train.amp=bf16", *SAMPLED) + ["--resume"]) == 0
    assert_same_training_state(
        straight / "checkpoints" / "step_0000040.pt", resumed / "checkpoints" / "step_0000040.pt"
    )


def test_ddp_two_ranks_equal_one_process_with_accumulation_two(toy_dir: Path, tmp_path: Path) -> None:
    """Rank r of 2 takes batches r, r + 2, ...; one process with accum_steps 2 takes the same two batches per
    step, and both normalise by the step's total target tokens, so they must compute the same gradients.

    Adam's update hardly depends on the gradient's scale, so the check is on its moments, which do: a
    normalisation off by the world size would show there even where the weights barely differ."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun, "torchrun ships with torch"
    single, double = tmp_path / "one", tmp_path / "two"
    common = ("train.max_steps=3", "train.eval_every=3", "train.save_every=1", "model.dropout=0.0")
    assert mt_train(toy_args(toy_dir, single, *common, "train.accum_steps=2")) == 0
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "training.cli", *toy_args(toy_dir, double, *common)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    meta_one = json.loads((single / "model.json").read_text())
    meta_two = json.loads((double / "model.json").read_text())
    assert meta_two["training"]["world_size"] == 2 and meta_one["training"]["world_size"] == 1
    assert meta_two["training"]["tokens_seen"] * 2 == pytest.approx(meta_one["training"]["tokens_seen"], rel=0.3)
    # After step 1 the moments are a function of the initial weights and the first two batches only (later
    # steps compound Adam's early, nearly sign-like updates, so float noise grows there).
    one = load_checkpoint(single / "checkpoints" / "step_0000001.pt")
    two = load_checkpoint(double / "checkpoints" / "step_0000001.pt")
    for i, state in one["optimizer"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            a, b = state[name], two["optimizer"]["state"][i][name]
            assert torch.allclose(a, b, rtol=1e-3, atol=1e-3 * float(a.abs().max())), (i, name)
    for name, value in one["model"].items():
        assert torch.allclose(value, two["model"][name], atol=1e-5), name


def test_r_drop_kl_matches_torch_kl_div() -> None:
    torch.manual_seed(0)
    a, b = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    target = torch.tensor([[4, 5, 6, 0, 0], [7, 8, 9, 10, 3]])
    lp_a, lp_b = a.log_softmax(-1), b.log_softmax(-1)
    kl = torch.nn.functional.kl_div  # kl_div(input=log q, target=log p, log_target) = KL(p || q)
    ref = 0.5 * (kl(lp_b, lp_a, log_target=True, reduction="none") + kl(lp_a, lp_b, log_target=True, reduction="none"))
    expected = ref.sum(-1)[target.ne(0)].sum()
    assert torch.allclose(r_drop_kl(a, b, target, pad_id=0), expected, atol=1e-5)
    assert r_drop_kl(a, a, target, pad_id=0).abs() < 1e-6


def test_r_drop_without_dropout_has_the_gradient_of_the_plain_loss(toy_dir: Path, tmp_path: Path) -> None:
    """With no dropout both passes agree, the KL term is 0 and the mean of two equal losses is the loss:
    the first step's gradient (Adam's first moment) must match a plain run's. With dropout it must not."""
    one_step = ("train.max_steps=1", "train.eval_every=1", "eval.max_sentences=1")
    runs = {
        "plain": (*one_step, "model.dropout=0.0"),
        "r_drop": (*one_step, "model.dropout=0.0", "train.r_drop_alpha=1.0"),
        "r_drop_dropout": (*one_step, "model.dropout=0.3", "train.r_drop_alpha=1.0"),
    }
    moments = {}
    for name, settings in runs.items():
        assert mt_train(toy_args(toy_dir, tmp_path / name, *settings)) == 0
        state = load_checkpoint(tmp_path / name / "checkpoints" / "step_0000001.pt")["optimizer"]["state"]
        moments[name] = [s["exp_avg"] for _, s in sorted(state.items())]

    # Tolerance on the scale of the whole gradient: the key projections' bias has a gradient of exactly 0
    # in theory (softmax ignores a constant), so it holds only float noise of ~1e-10.
    scale = max(float(m.abs().max()) for m in moments["plain"])

    def close(a: torch.Tensor, b: torch.Tensor) -> bool:
        return torch.allclose(a, b, rtol=1e-3, atol=1e-5 * scale)

    assert all(close(a, b) for a, b in zip(moments["plain"], moments["r_drop"], strict=True))
    assert not all(close(a, b) for a, b in zip(moments["plain"], moments["r_drop_dropout"], strict=True))
