"""CPU sessions leave out the graph fusions whose CPU kernels are slower than the ops they replace."""

from __future__ import annotations

import collections
from pathlib import Path

import onnx

from model.model_dir import read_model_dir
from model.runtime import OrtModel, disabled_fusions, session_options


def optimized_op_counts(model_dir: Path, tmp_path: Path, providers: list) -> collections.Counter:
    options = session_options(intra_op_threads=1)
    options.optimized_model_filepath = str(tmp_path / "decoder.optimized.onnx")
    onnx_dir = model_dir / "onnx"
    config = read_model_dir(model_dir).config
    OrtModel.from_files(onnx_dir / "encoder.onnx", onnx_dir / "decoder.onnx", config, "fp32", providers, options)
    graph = onnx.load(options.optimized_model_filepath).graph
    return collections.Counter(node.op_type for node in graph.node)


def test_cpu_sessions_keep_add_and_layer_norm_unfused(served_model_dir: Path, tmp_path: Path) -> None:
    ops = optimized_op_counts(served_model_dir, tmp_path, ["CPUExecutionProvider"])
    assert ops["SkipLayerNormalization"] == 0 and ops["LayerNormalization"] > 0
    # The other fusions still run (the fused MatMul + scale + transpose of attention scores).
    assert ops["FusedMatMul"] > 0


def test_gpu_sessions_keep_every_fusion() -> None:
    assert disabled_fusions(["CPUExecutionProvider"]) == ["SkipLayerNormFusion"]
    assert disabled_fusions(["CUDAExecutionProvider", "CPUExecutionProvider"]) == []
    assert disabled_fusions([("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]) == []
