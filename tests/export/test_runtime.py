"""model.runtime: runs without torch, the IO-binding step function equals the host one, clear load errors."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from functools import partial
from pathlib import Path

import numpy as np
import pytest

import model.runtime as runtime
from export.validate import step_parity
from model import manifest
from model.model_dir import ModelDirError, read_model_dir
from model.runtime import IoBindingStepFunction, OrtModel, OrtModelError


def test_io_binding_step_function_equals_the_host_one(exported_model_dir: Path) -> None:
    model = OrtModel.load(exported_model_dir, "fp32")
    parity = step_parity(
        model.step_function,
        partial(IoBindingStepFunction, model, device="cpu"),
        model.config.vocab_size,
        shapes=((5, 37, 11), (1, 1, 0)),
    )
    assert parity.max_abs_diff == 0.0


def test_run_step_writes_each_rows_kv_in_place_at_its_position(
    exported_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A big cache is written in place (the presents are the past buffers), each row's new K/V at its own
    position and nowhere else; a plain run (what small caches get) gives the same outputs and slots; a row at
    the cache's capacity is refused before the call."""
    model = OrtModel.load(exported_model_dir, "fp32")
    cfg, rng = model.config, np.random.default_rng(0)
    rows, capacity, src_len = 64, 40, 5
    assert rows * cfg.n_heads * capacity * cfg.head_dim >= runtime.IN_PLACE_MIN
    positions = rng.integers(0, capacity, rows)
    feeds = {
        "tokens": rng.integers(4, cfg.vocab_size, (rows, 1)),
        "positions": positions[:, None],
        "top_k": np.zeros(3, dtype=np.int64),
        "src_pad_mask": np.zeros((rows, src_len), dtype=bool),
    }
    shape = (rows, cfg.n_heads, capacity, cfg.head_dim)
    past = [rng.standard_normal(shape).astype(np.float32) for _ in model.past_names]
    cross = [rng.standard_normal((rows, cfg.n_heads, src_len, cfg.head_dim)).astype(np.float32) for _ in past]
    before = [p.copy() for p in past]
    out, present = model.run_step(dict(feeds), past, cross)
    assert all(p is q for p, q in zip(present, past, strict=True))
    for new, old in zip(present, before, strict=True):
        changed = (new != old).any(axis=(1, 3))  # (rows, capacity) slots written
        assert [np.flatnonzero(c).tolist() for c in changed] == [[p] for p in positions]
    monkeypatch.setattr(runtime, "IN_PLACE_MIN", 1 << 40)  # every cache through a plain run
    plain_out, plain_present = model.run_step(dict(feeds), before, cross)
    assert all(p is not q for p, q in zip(plain_present, before, strict=True))
    for a, b in zip(out, plain_out, strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(present, plain_present, strict=True):  # slots after a row's position: never read, may differ
        for r, p in enumerate(positions):
            np.testing.assert_array_equal(a[r, :, : p + 1], b[r, :, : p + 1])
    feeds["positions"] = np.full((rows, 1), capacity)
    with pytest.raises(ValueError, match="grow the cache before the step"):
        model.run_step(feeds, before, cross)


def test_a_graph_from_an_older_export_says_to_re_export(exported_model_dir: Path, tmp_path: Path) -> None:
    """Same input names, but the cross K/V and source mask per row (the graph before they went per sentence)."""
    import onnx

    model_dir = tmp_path / "model"
    shutil.copytree(exported_model_dir, model_dir)
    path = model_dir / "onnx" / "decoder.onnx"
    graph = onnx.load(str(path))
    for value in graph.graph.input:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == "sentences":
                dim.dim_param = "rows"
    onnx.save(graph, str(path))
    with pytest.raises(
        OrtModelError,
        match=r"decoder\.onnx is from an older export: its input src_pad_mask has axes "
        r"\['rows', 'src_len'\], this version declares \['sentences', 'src_len'\]: re-export",
    ):
        OrtModel.load(model_dir, "fp32")


def test_a_missing_variant_says_how_to_export_it(exported_model_dir: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(exported_model_dir, model_dir, ignore=shutil.ignore_patterns("*.int8.onnx"))
    with pytest.raises(OrtModelError, match=r"encoder\.int8\.onnx is missing: run `mt-export .* --int8 --force`"):
        OrtModel.load(model_dir, "int8")
    with pytest.raises(OrtModelError, match="unknown ONNX variant 'int4'"):
        OrtModel.load(model_dir, "int4")
    assert read_model_dir(model_dir).config == OrtModel.load(model_dir, "fp32").config


def test_runtime_runs_without_torch(exported_model_dir: Path) -> None:
    code = textwrap.dedent(
        f"""
        import sys

        class BlockTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this test")

        sys.meta_path.insert(0, BlockTorch())
        import numpy as np
        from model.runtime import OrtModel
        from model.search import beam_search

        model = OrtModel.load({str(exported_model_dir)!r}, "fp32")
        ids, mask = np.array([[5, 6, 3]]), np.zeros((1, 3), dtype=bool)
        hyps = beam_search(model.step_function(ids, mask), [3], bos_id=2, eos_id=3)
        assert "torch" not in sys.modules
        print("ok", len(hyps))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok 1"


def test_model_dir_is_hashed_once_and_a_changed_graph_is_caught(
    exported_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(exported_model_dir, model_dir)
    hashed: list[str] = []
    real_sha256 = manifest.sha256

    def counting(path: Path) -> str:
        hashed.append(path.name)
        return real_sha256(path)

    monkeypatch.setattr(manifest, "sha256", counting)
    for _ in range(3):  # mt-serve's check, the engine's load, the client's check
        assert manifest.check_model_dir(model_dir, "fp32").variant == "fp32"
    assert sorted(hashed) == ["decoder.onnx", "encoder.onnx"]
    with (model_dir / "onnx" / "decoder.onnx").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(ModelDirError, match=r"decoder\.onnx: missing or changed since export"):
        manifest.check_model_dir(model_dir, "fp32")
