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
    assert inputs["past_key_0"] == ["rows", heads, "past_len", head_dim]
    assert inputs["self_pad_mask"] == ["rows", "past_len"]
    assert inputs["positions"] == ["rows", 1]
    assert inputs["cross_value_1"] == ["rows", heads, "src_len", head_dim]
    assert outputs["present_value_1"] == ["rows", heads, "past_len + 1", head_dim]
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
