"""Validation step 1: the exported graphs pass onnx.checker and match the declared names, dtypes and axes."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from export.validate import DynamicAxesError, GraphCheckError, SignatureError, check_graph, check_variant_graphs
from model.model_dir import read_model_dir
from model.signature import VARIANTS, decoder_signature


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_exported_graphs_match_the_declaration(exported_model_dir: Path, variant: str) -> None:
    config = read_model_dir(exported_model_dir).config
    check_variant_graphs(exported_model_dir / "onnx", config, variant)


def test_decoder_axes_are_symbolic_and_there_is_no_control_flow(exported_model_dir: Path) -> None:
    graph = onnx.load(str(exported_model_dir / "onnx" / "decoder.onnx")).graph
    config = read_model_dir(exported_model_dir).config

    def axes(value: onnx.ValueInfoProto) -> list[str | int]:
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    inputs = {v.name: axes(v) for v in graph.input}
    outputs = {v.name: axes(v) for v in graph.output}
    heads, head_dim = config.n_heads, config.head_dim
    assert inputs["past_key_0"] == ["rows", heads, "capacity", head_dim]  # right-padded, no mask input
    assert "self_pad_mask" not in inputs
    assert inputs["positions"] == ["rows", 1]
    assert inputs["cross_value_1"] == ["sentences", heads, "src_len", head_dim]  # shared by the beams
    assert outputs["present_value_1"] == ["rows", heads, "capacity", head_dim]  # the past's buffer, bound in place
    ops = [n.op_type for n in graph.node]
    assert ops.count("GroupQueryAttention") == config.n_decoder_layers
    past = {v for v in inputs if v.startswith("past_")}
    readers = {n.op_type for n in graph.node if not set(n.input).isdisjoint(past)}
    assert readers <= {"GroupQueryAttention", "Shape"}  # nothing copies the cache (no Concat, no Gather)
    assert outputs["scores"] == outputs["ids"] == ["rows", "k"]  # candidates, not the vocabulary-wide table
    assert config.vocab_size not in [d for value in outputs.values() for d in value]
    assert not {n.op_type for n in graph.node} & {"If", "Loop", "Scan"}


def _edited_decoder(exported_model_dir: Path, tmp_path: Path, edit) -> Path:
    model = onnx.load(str(exported_model_dir / "onnx" / "decoder.onnx"))
    edit(model)
    path = tmp_path / "decoder.onnx"
    onnx.save(model, str(path))
    return path


def test_a_fixed_dynamic_axis_is_named(exported_model_dir: Path, tmp_path: Path) -> None:
    def fix_rows(model: onnx.ModelProto) -> None:
        model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 6

    path = _edited_decoder(exported_model_dir, tmp_path, fix_rows)
    config = read_model_dir(exported_model_dir).config
    with pytest.raises(DynamicAxesError, match="axis 0 of tokens is fixed to 6, declared dynamic 'rows'"):
        check_graph(path, decoder_signature(config))


def test_a_renamed_input_is_named(exported_model_dir: Path, tmp_path: Path) -> None:
    def rename(model: onnx.ModelProto) -> None:
        for node in model.graph.node:
            node.input[:] = ["step" if i == "positions" else i for i in node.input]
        model.graph.input[1].name = "step"

    path = _edited_decoder(exported_model_dir, tmp_path, rename)
    config = read_model_dir(exported_model_dir).config
    with pytest.raises(SignatureError, match=r"inputs \['tokens', 'step', 'top_k'"):
        check_graph(path, decoder_signature(config))


def test_a_broken_graph_fails_the_checker_first(exported_model_dir: Path, tmp_path: Path) -> None:
    def dangle(model: onnx.ModelProto) -> None:
        model.graph.node[0].input[0] = "no_such_tensor"

    path = _edited_decoder(exported_model_dir, tmp_path, dangle)
    config = read_model_dir(exported_model_dir).config
    with pytest.raises(GraphCheckError, match=r"onnx\.checker rejects"):
        check_graph(path, decoder_signature(config))


def test_int8_matmuls_take_quantized_inputs_and_residuals_stay_float(exported_model_dir: Path, tmp_path: Path) -> None:
    """QDQ int8: every weight MatMul reads an 8-bit activation and gives a float result (one fused
    MatMulIntegerToFloat per MatMul once onnxruntime optimizes it; those with a bias are written so by the
    exporter, the bias inside), and nothing else reads a rounded one."""
    import onnxruntime as ort

    path = exported_model_dir / "onnx" / "decoder.int8.onnx"
    graph = onnx.load(str(path)).graph
    producer = {out: node for node in graph.node for out in node.output}
    readers = [
        (node.op_type, producer[name].op_type)
        for node in graph.node
        for name in node.input
        if name in producer and producer[name].op_type == "DequantizeLinear"
    ]
    assert readers and {reader for reader, _ in readers} == {"MatMul"}  # residual Adds read the float tensor
    assert not {n.op_type for n in graph.node} & {"QLinearMatMul"}  # no 8-bit requantized products

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]
    qdq = [
        n
        for n in graph.node
        if n.op_type == "MatMul" and n.input[1] in producer and producer[n.input[1]].op_type == "DequantizeLinear"
    ]
    biased = [n for n in graph.node if n.op_type == "MatMulIntegerToFloat"]  # written by the exporter, bias inside
    initializers = {init.name for init in graph.initializer}
    assert biased and all(len(n.input) == 7 and n.input[6] in initializers for n in biased)
    readers_of = {name: [n for n in graph.node if name in n.input] for name in (m.output[0] for m in qdq)}
    assert (
        not [  # no weight MatMul is left with its bias Add beside it
            m for m in qdq if any(r.op_type == "Add" and set(r.input) & initializers for r in readers_of[m.output[0]])
        ]
    )
    assert ops.count("MatMulIntegerToFloat") == len(qdq) + len(biased)
    assert "DequantizeLinear" not in ops  # each Q -> DQ pair fused into its MatMul
