"""Export a Transformer to encoder.onnx and decoder.onnx (torch dynamo exporter), and derive the variants.

- fp32: the network as trained.
- fp16: the network cast to half and exported as such. The network's masks use ``finfo(dtype).min`` of
  the tensor's own dtype (finite in fp16), LayerNormalization is emitted with ``stash_type`` float32
  (statistics in fp32), and the log-softmax runs on float32 logits, so no post-hoc float16 conversion
  (which would clip float32 constants and need op block lists) is involved. Log-probs and attention
  stay float32; K/V inputs and outputs are float16, so the cache lives on the device at half the size.
- int8: onnxruntime static quantization of the fp32 graphs (int8 weights of every weight MatMul, per
  channel; activation scales calibrated once on real decoding, so no translation depends on its batch),
  for CPU.

Why the dynamo exporter: in torch 2.13 it is the default and the legacy TorchScript one is deprecated;
with ``dynamic_shapes`` it keeps our axis names in the graph and derives output axes symbolically
(the cache's ``capacity``) instead of inventing names per output, and it needs no patches to this network.
"""

from __future__ import annotations

import copy
import inspect
import logging
import warnings
from pathlib import Path

import onnx
import onnxscript.optimizer
import torch
from torch import Tensor, nn
from torch.export import Dim

from export.wrappers import DecoderStepGraph, EncoderGraph
from model.signature import VARIANTS, GraphSignature, decoder_signature, encoder_signature
from model.transformer import Transformer

logger = logging.getLogger(__name__)

OPSET = 18
EXPORTER = "torch.onnx.export(dynamo=True)"
FOLD_LIMIT = 1 << 28  # elements: constant-fold weight concatenations of any model size

# Sizes of the tracing example: each at least 2 and all different, so torch.export neither specializes
# an axis to 0/1 nor merges two axes that happen to be equal. Validation runs at other sizes.
EXAMPLE_SIZES = {"batch": 3, "src_len": 7, "rows": 6, "sentences": 2, "capacity": 5, "k": 9}  # rows = 3 x sentences


class ExportError(RuntimeError):
    """torch could not export a graph; the message names the graph and the cause."""


def example_inputs(signature: GraphSignature, model: Transformer, dtype: torch.dtype) -> tuple[Tensor, ...]:
    """Inputs for tracing, shaped by the signature at ``EXAMPLE_SIZES``, with valid token ids and indices."""
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    out: list[Tensor] = []
    for spec in signature.inputs:
        shape = tuple(EXAMPLE_SIZES[a] if isinstance(a, str) else a for a in spec.axes)
        if spec.name == "positions":  # rows at different positions, each inside the cache's capacity
            out.append(torch.arange(shape[0], dtype=torch.int64)[:, None] % EXAMPLE_SIZES["capacity"])
        elif spec.name == "top_k":
            out.append(torch.zeros(shape, dtype=torch.int64))
        elif spec.dtype == "int64":
            out.append(torch.randint(4, vocab, shape, generator=gen))
        elif spec.dtype == "bool":
            mask = torch.zeros(shape, dtype=torch.bool)
            mask[0, -2:] = True  # one row padded, as in a real batch
            out.append(mask)
        else:
            out.append(torch.randn(shape, generator=gen).to(dtype))
    return tuple(out)


def dynamic_shapes(signature: GraphSignature, module: nn.Module) -> tuple:
    """torch.export dynamic shapes for the signature's inputs, nested the way ``module.forward`` takes them.

    The same ``Dim`` object for the same axis name tells torch.export that those axes are equal.
    """
    dims = {name: Dim(name) for spec in signature.inputs for name in spec.dynamic_axes().values()}
    flat = [{i: dims[name] for i, name in spec.dynamic_axes().items()} or None for spec in signature.inputs]
    params = inspect.signature(module.forward).parameters.values()
    n_named = sum(p.kind is not inspect.Parameter.VAR_POSITIONAL for p in params)
    if n_named == len(flat):
        return tuple(flat)
    return (*flat[:n_named], tuple(flat[n_named:]))  # *varargs are one nested entry


def export_graph(module: nn.Module, signature: GraphSignature, args: tuple[Tensor, ...], path: Path) -> Path:
    """Trace ``module`` with ``args`` and write one self-contained ONNX file at ``path``."""
    logger.info("exporting %s to %s", signature.name, path)
    try:
        with warnings.catch_warnings():
            # The exporter warns about axis renaming and missing torchvision ops; neither concerns us.
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                dynamic_shapes=dynamic_shapes(signature, module),
                input_names=signature.input_names,
                output_names=signature.output_names,
                opset_version=OPSET,
                optimize=True,
                verbose=False,
            )
    except Exception as error:  # the exporter raises many types; name the graph and re-raise as one
        raise ExportError(f"torch.onnx.export failed for the {signature.name} graph: {error}") from error
    # The network concatenates weights for its fused projections (q/k/v, every layer's cross k/v); fold those
    # Concat nodes into single initializers, so the file holds one weight per MatMul and int8 quantization
    # (which quantizes initializer weights only) reaches them. The default limits stop at small tensors.
    onnxscript.optimizer.fold_constants(program.model, input_size_limit=FOLD_LIMIT, output_size_limit=FOLD_LIMIT)
    program.save(str(path), external_data=False)
    return path


def export_torch_graphs(model: Transformer, out_dir: Path, variant: str) -> list[Path]:
    """encoder and decoder of the fp32 or fp16 variant, exported from (a copy of) ``model``."""
    dtype = {"fp32": torch.float32, "fp16": torch.float16}[variant]
    net = copy.deepcopy(model).to("cpu", dtype).eval()
    enc_file, dec_file, _ = VARIANTS[variant]
    enc_sig, dec_sig = encoder_signature(net.config), decoder_signature(net.config)
    encoder, decoder = EncoderGraph(net).eval(), DecoderStepGraph(net).eval()
    return [
        export_graph(encoder, enc_sig, example_inputs(enc_sig, net, dtype), out_dir / enc_file),
        export_graph(decoder, dec_sig, example_inputs(dec_sig, net, dtype), out_dir / dec_file),
    ]


def quantize_int8(out_dir: Path, feeds: dict[str, list]) -> list[Path]:
    """int8 static quantization of the fp32 graphs already in ``out_dir``, calibrated on ``feeds``.

    The weight of every MatMul with a weight (projections, FFN, output layer) becomes int8, one scale per
    output channel, in 7 bits (``reduce_range``: no int16 saturation in the u8×s8 products of CPUs without
    VNNI). Each such MatMul's input is quantized with a scale fixed here from the calibration feeds
    (``export.calibrate``: min/max over real decoding), not per call from the batch at hand, so int8
    translations do not depend on the batch. The attention products (activation × activation) stay
    float. The graphs first go through onnxruntime's quantization pre-processing, as it asks.

    QDQ form, MatMul outputs left float: onnxruntime fuses each quantized input, int8 weight and MatMul into
    one MatMulIntegerToFloat (int8 product, float result), where the QOperator form needs QuantizeLinear →
    QLinearMatMul → DequantizeLinear and requantizes every product to 8 bits on the way out. The residual
    connections then read the float activations again (:func:`_float_residuals`). Bundled model: 203 → 184
    decoder ops, about the same speed, more translations identical to torch (README, Export). Then each such
    MatMul with a bias is written as that fused op with the bias inside it (:func:`_fuse_biased_matmuls`).
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from export.calibrate import FeedReader

    paths = []
    for graph, src, dst in zip(("encoder", "decoder"), VARIANTS["fp32"][:2], VARIANTS["int8"][:2], strict=True):
        if not (out_dir / src).is_file():
            raise ExportError(f"int8 quantization needs {out_dir / src}: export the fp32 variant first")
        logger.info("quantizing %s to int8 (static, %d calibration feeds)", src, len(feeds[graph]))
        prepared = out_dir / f".{dst}.prepared"
        try:
            # onnxruntime's symbolic shape inference cannot follow the grouped top-k; onnx's own inference can.
            quant_pre_process(out_dir / src, prepared, skip_symbolic_shape=True)
            quantize_static(
                prepared,
                out_dir / dst,
                FeedReader(feeds[graph]),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=["MatMul"],
                nodes_to_quantize=_weight_matmuls(prepared),
                per_channel=True,
                reduce_range=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                extra_options={"OpTypesToExcludeOutputQuantization": ["MatMul"]},
            )
            model = onnx.load(str(out_dir / dst))
            _float_residuals(model)
            _fuse_biased_matmuls(model)
            onnx.save(model, str(out_dir / dst))
        finally:
            prepared.unlink(missing_ok=True)
        paths.append(out_dir / dst)
    return paths


def _float_residuals(model: onnx.ModelProto) -> None:
    """Let every consumer of a quantized activation other than a MatMul read the float tensor instead.

    In the QDQ form a tensor that feeds a quantized MatMul is replaced, for all its readers, by its
    quantized-dequantized copy: the residual Add after each LayerNorm would add a value rounded to 8 bits
    (an error the QOperator form never made) and cost a DequantizeLinear per reader. Rewiring those readers
    to the QuantizeLinear's own input leaves the Q → DQ pair to the MatMul alone, which onnxruntime fuses.
    """
    producer = {out: node for node in model.graph.node for out in node.output}
    for node in model.graph.node:
        if node.op_type == "MatMul":
            continue
        for i, name in enumerate(node.input):
            dq = producer.get(name)
            q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[i] = q.input[0]  # the float activation, before its 8-bit rounding


def _fuse_biased_matmuls(model: onnx.ModelProto) -> int:
    """Write each quantized weight MatMul followed by its bias Add as one ``com.microsoft.MatMulIntegerToFloat``
    with the bias as its input; returns how many were fused.

    onnxruntime fuses a Q → DQ → MatMul ← DQ ← int8 weight pattern into MatMulIntegerToFloat by itself, but leaves
    the bias Add after it a node of its own (12 per decoder step: a dispatch each, and one more pass over the
    output). The op computes ``(A - a_zero_point) (B - b_zero_point) a_scale b_scale + bias``: the same as the
    pattern it replaces. MatMuls without a bias are left to onnxruntime's own fusion.
    """
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    weights = {init.name: init for init in graph.initializer}
    fused, dropped = 0, set()
    for node in list(graph.node):
        if node.op_type != "MatMul":
            continue
        dq_a, dq_b = producer.get(node.input[0]), producer.get(node.input[1])
        add = readers.get(node.output[0], [])
        if not (dq_a is not None and dq_b is not None and dq_a.op_type == dq_b.op_type == "DequantizeLinear"):
            continue
        if len(add) != 1 or add[0].op_type != "Add" or dq_b.input[0] not in weights or len(dq_a.input) < 3:
            continue
        add = add[0]
        bias = next((name for name in add.input if name != node.output[0]), None)
        if bias not in weights or len(weights[bias].dims) != 1:
            continue
        fused_node = onnx.helper.make_node(
            "MatMulIntegerToFloat",
            [dq_a.input[0], dq_b.input[0], dq_a.input[1], dq_b.input[1], dq_a.input[2], dq_b.input[2], bias],
            list(add.output),
            name=f"{node.name}_int8_bias",
            domain="com.microsoft",
        )
        graph.node.insert(list(graph.node).index(node), fused_node)
        dropped |= {id(node), id(add)}
        for dq in (dq_a, dq_b):  # the DequantizeLinear nodes go when nothing else reads them
            if all(id(reader) in dropped for reader in readers.get(dq.output[0], [])):
                dropped.add(id(dq))
        fused += 1
    kept = [node for node in graph.node if id(node) not in dropped]
    del graph.node[:]
    graph.node.extend(kept)
    if fused and not any(op.domain == "com.microsoft" for op in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return fused


def _weight_matmuls(path: Path) -> list[str]:
    """Names of the MatMul nodes whose second input is a weight (an initializer)."""
    graph = onnx.load(str(path)).graph
    weights = {init.name for init in graph.initializer}
    return [node.name for node in graph.node if node.op_type == "MatMul" and node.input[1] in weights]


def export_variant(
    model: Transformer, out_dir: Path, variant: str, calibration: dict[str, list] | None = None
) -> list[Path]:
    """Write one variant's two graphs into ``out_dir``; int8 is derived from the fp32 files there and needs
    ``calibration`` feeds (``export.calibrate.calibration_feeds``)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {sorted(VARIANTS)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    if variant == "int8":
        if calibration is None:
            raise ValueError("the int8 variant needs calibration feeds from the fp32 graphs")
        return quantize_int8(out_dir, calibration)
    return export_torch_graphs(model, out_dir, variant)
