"""Probe for the next step graph: onnxruntime's CPU ``com.microsoft.GroupQueryAttention`` as the decoder's
self-attention over a right-padded K/V cache shared between past and present, against the attention block the
step graph has today (present = Concat(past, new), MatMul / Softmax / MatMul over a left-padded cache with a mask).

    .venv/bin/python benchmarks/probe_gqa.py [--threads 1] [--rounds 300] [--export]

For each case (rows N, each row's past length) it prints the largest difference of both blocks' outputs from a
numpy reference (per row: its own past plus the new token), whether GQA wrote each row's new K at its own length
in the shared buffer, and the time of one call of each block (medians of interleaved rounds). The shared buffer
is bound as both past and present (IO binding), so GQA appends in place; rows at different lengths need no left
padding and no mask (``seqlens_k`` = each row's past length). Only the attention block is timed: the q/k/v
projections, the beam reorder of the cache and the rest of the step are the same either way.

``--export`` also checks that torch's dynamo exporter can emit the op: a module whose self-attention step
(right-padded cache, per-row lengths) runs in torch eagerly and, under ``torch.onnx.export``, becomes
``com.microsoft.GroupQueryAttention`` through ``torch.onnx.ops.symbolic_multi_out``; it prints the exported
nodes and the largest difference between onnxruntime and torch at the export shapes and at other ones.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

H, DH = 4, 64  # the bundled model's heads and head size
D = H * DH


def _io(name: str, elem: int, shape: list) -> object:
    return helper.make_tensor_value_info(name, elem, shape)


def gqa_graph() -> bytes:
    node = helper.make_node(
        "GroupQueryAttention",
        ["q", "k", "v", "past_k", "past_v", "seqlens_k", "total_len"],
        ["out", "present_k", "present_v"],
        domain="com.microsoft",
        num_heads=H,
        kv_num_heads=H,
    )
    f = TensorProto.FLOAT
    inputs = [_io(n, f, ["N", 1, D]) for n in ("q", "k", "v")]
    inputs += [_io(n, f, ["N", H, "M", DH]) for n in ("past_k", "past_v")]
    inputs += [_io("seqlens_k", TensorProto.INT32, ["N"]), _io("total_len", TensorProto.INT32, [])]
    outputs = [_io("out", f, ["N", 1, D])] + [_io(n, f, ["N", H, "M", DH]) for n in ("present_k", "present_v")]
    graph = helper.make_graph([node], "gqa", inputs, outputs)
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=9).SerializeToString()


def concat_graph() -> bytes:
    """Today's block: heads split, K/V appended by Concat, masked softmax attention, heads merged."""
    mk = helper.make_node
    nodes = [
        *(mk("Reshape", [x, "shape4"], [f"{x}4"]) for x in ("q", "k", "v")),  # (N, 1, H, Dh)
        *(mk("Transpose", [f"{x}4"], [f"{x}h"], perm=[0, 2, 1, 3]) for x in ("q", "k", "v")),  # (N, H, 1, Dh)
        mk("Concat", ["past_k", "kh"], ["present_k"], axis=2),  # (N, H, P+1, Dh)
        mk("Concat", ["past_v", "vh"], ["present_v"], axis=2),
        mk("Transpose", ["present_k"], ["kt"], perm=[0, 1, 3, 2]),
        mk("MatMul", ["qh", "kt"], ["scores"]),  # (N, H, 1, P+1)
        mk("Mul", ["scores", "scale"], ["scaled"]),
        mk("Add", ["scaled", "bias"], ["masked"]),
        mk("Softmax", ["masked"], ["probs"], axis=-1),
        mk("MatMul", ["probs", "present_v"], ["heads"]),  # (N, H, 1, Dh)
        mk("Transpose", ["heads"], ["merged"], perm=[0, 2, 1, 3]),
        mk("Reshape", ["merged", "shape3"], ["out"]),  # (N, 1, D)
    ]
    constants = [
        helper.make_tensor("shape4", TensorProto.INT64, [4], [0, 1, H, DH]),
        helper.make_tensor("shape3", TensorProto.INT64, [3], [0, 1, D]),
        helper.make_tensor("scale", TensorProto.FLOAT, [], [DH**-0.5]),
    ]
    f = TensorProto.FLOAT
    inputs = [_io(n, f, ["N", 1, D]) for n in ("q", "k", "v")]
    inputs += [_io(n, f, ["N", H, "P", DH]) for n in ("past_k", "past_v")] + [_io("bias", f, ["N", 1, 1, "P1"])]
    outputs = [_io("out", f, ["N", 1, D])] + [_io(n, f, ["N", H, "P1", DH]) for n in ("present_k", "present_v")]
    graph = helper.make_graph(nodes, "concat", inputs, outputs, constants)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9).SerializeToString()


def reference(q, k, v, past_k, past_v, lengths) -> np.ndarray:
    out = np.zeros_like(q)
    for r, n in enumerate(lengths):
        keys = np.concatenate([past_k[r, :, :n], k[r, 0].reshape(H, 1, DH)], axis=1)  # (H, n+1, Dh)
        values = np.concatenate([past_v[r, :, :n], v[r, 0].reshape(H, 1, DH)], axis=1)
        scores = q[r, 0].reshape(H, 1, DH) @ keys.transpose(0, 2, 1) / np.sqrt(DH)  # (H, 1, n+1)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        out[r, 0] = ((probs / probs.sum(-1, keepdims=True)) @ values).reshape(D)
    return out


def case(sessions, n_rows: int, lengths: np.ndarray, rounds: int, rng: np.random.Generator) -> str:
    gqa, concat = sessions
    capacity = int(lengths.max()) + 8  # the shared buffer's room (appends land inside it)
    q, k, v = (rng.standard_normal((n_rows, 1, D), dtype=np.float32) for _ in range(3))
    past_k = np.zeros((n_rows, H, capacity, DH), np.float32)  # right-padded: row r's past in [0, lengths[r])
    past_v = np.zeros_like(past_k)
    for r, n in enumerate(lengths):
        past_k[r, :, :n] = rng.standard_normal((H, n, DH))
        past_v[r, :, :n] = rng.standard_normal((H, n, DH))
    expected = reference(q, k, v, past_k, past_v, lengths)

    shared = [ort.OrtValue.ortvalue_from_numpy(past_k.copy()), ort.OrtValue.ortvalue_from_numpy(past_v.copy())]
    binding = gqa.io_binding()
    for name, array in (("q", q), ("k", k), ("v", v), ("seqlens_k", lengths.astype(np.int32))):
        binding.bind_cpu_input(name, array)
    binding.bind_cpu_input("total_len", np.array(int(lengths.max()) + 1, np.int32))
    binding.bind_ortvalue_input("past_k", shared[0])
    binding.bind_ortvalue_input("past_v", shared[1])
    binding.bind_output("out", "cpu")
    binding.bind_ortvalue_output("present_k", shared[0])  # the same buffer: appended in place
    binding.bind_ortvalue_output("present_v", shared[1])

    def run_gqa() -> np.ndarray:
        gqa.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()

    longest = int(lengths.max())  # today's layout: left-padded to the longest past, the rest masked
    left_k = np.zeros((n_rows, H, longest, DH), np.float32)
    left_v = np.zeros_like(left_k)
    bias = np.zeros((n_rows, 1, 1, longest + 1), np.float32)
    for r, n in enumerate(lengths):
        left_k[r, :, longest - n :] = past_k[r, :, :n]
        left_v[r, :, longest - n :] = past_v[r, :, :n]
        bias[r, 0, 0, : longest - n] = -1e9
    feeds = {"q": q, "k": k, "v": v, "past_k": left_k, "past_v": left_v, "bias": bias}

    def run_concat() -> np.ndarray:
        return concat.run(None, feeds)[0]

    gqa_diff = float(np.abs(run_gqa() - expected).max())
    appended = bool(np.allclose(shared[0].numpy()[np.arange(n_rows), :, lengths], k[:, 0].reshape(n_rows, H, DH)))
    concat_diff = float(np.abs(run_concat() - expected).max())
    times: dict[str, list[float]] = {"gqa": [], "concat": []}
    for _ in range(rounds):  # interleaved, so drifts of this machine's speed hit both alike
        for name, fn in (("gqa", run_gqa), ("concat", run_concat)):
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    g, c = (statistics.median(times[x]) * 1e6 for x in ("gqa", "concat"))
    return (
        f"{n_rows:5d} {lengths.min():4d}-{lengths.max():<4d} {gqa_diff:10.1e} {concat_diff:10.1e} {appended!s:>9} "
        f"{g:9.0f} {c:9.0f} {c / g:7.2f}x"
    )


def export_check() -> None:
    """Export a q/k/v projection + self-attention step whose attention is GQA in ONNX and torch ops eagerly."""
    import torch  # only this check needs torch

    def attend(q, k, v, past_k, past_v, lengths):  # torch: row r's past in [0, lengths[r]), the new K/V at lengths[r]
        n, capacity = past_k.shape[0], past_k.shape[2]
        rows = torch.arange(n)
        present_k, present_v = past_k.clone(), past_v.clone()
        present_k[rows, :, lengths] = k.view(n, H, DH)
        present_v[rows, :, lengths] = v.view(n, H, DH)
        scores = q.view(n, 1, H, DH).transpose(1, 2) @ present_k.transpose(2, 3) / DH**0.5  # (N, H, 1, M)
        visible = torch.arange(capacity)[None, :] <= lengths[:, None]  # (N, M)
        scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
        return (scores.softmax(-1) @ present_v).transpose(1, 2).reshape(n, 1, D), present_k, present_v

    class Step(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv = torch.nn.Linear(D, 3 * D)

        def forward(self, x, past_k, past_v, lengths):
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            if not torch.onnx.is_in_onnx_export():
                return attend(q, k, v, past_k, past_v, lengths)
            seqlens, total = lengths.to(torch.int32), (lengths.max() + 1).to(torch.int32)
            return torch.onnx.ops.symbolic_multi_out(
                "com.microsoft::GroupQueryAttention",
                (q, k, v, past_k, past_v, seqlens, total),
                {"num_heads": H, "kv_num_heads": H},
                dtypes=(q.dtype, past_k.dtype, past_v.dtype),
                shapes=(q.shape, past_k.shape, past_v.shape),
                version=1,
            )

    torch.manual_seed(0)
    module = Step().eval()

    def inputs(n_rows: int, capacity: int, lengths: list[int]) -> tuple:
        return (
            torch.randn(n_rows, 1, D),
            torch.randn(n_rows, H, capacity, DH),
            torch.randn(n_rows, H, capacity, DH),
            torch.tensor(lengths),
        )

    rows, capacity = torch.export.Dim("rows"), torch.export.Dim("capacity")
    program = torch.onnx.export(
        module,
        inputs(6, 16, [0, 3, 7, 2, 10, 5]),
        dynamo=True,
        dynamic_shapes={
            "x": {0: rows},
            "past_k": {0: rows, 2: capacity},
            "past_v": {0: rows, 2: capacity},
            "lengths": {0: rows},
        },
        input_names=["x", "past_k", "past_v", "lengths"],
        output_names=["out", "present_k", "present_v"],
        opset_version=18,
        verbose=False,
    )
    print("exported nodes:", [node.op_type for node in program.model.graph])
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for n_rows, cap, lengths in ((6, 16, [0, 3, 7, 2, 10, 5]), (3, 40, [30, 0, 12])):
        args = inputs(n_rows, cap, lengths)
        with torch.no_grad():
            expected = module(*args)
        feeds = dict(zip(["x", "past_k", "past_v", "lengths"], (a.numpy() for a in args), strict=True))
        got = session.run(None, feeds)
        diff = float(np.abs(got[0] - expected[0].numpy()).max())
        present = expected[1].numpy()
        kept = all(np.allclose(got[1][r, :, : n + 1], present[r, :, : n + 1], atol=1e-6) for r, n in enumerate(lengths))
        print(f"rows {n_rows}, capacity {cap}: onnxruntime vs torch {diff:.1e}; each row's present K equal: {kept}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--export", action="store_true", help="also check that torch's exporter emits the op")
    args = parser.parse_args()
    if args.export:
        export_check()
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    sessions = [
        ort.InferenceSession(g, options, providers=["CPUExecutionProvider"]) for g in (gqa_graph(), concat_graph())
    ]
    rng = np.random.default_rng(0)
    print(f"onnxruntime {ort.__version__}, {args.threads} thread(s), heads {H} x {DH}; times: median us per call")
    print(" rows  past  gqa-vs-ref concat-vs-ref  appended  gqa (us) concat (us) concat/gqa")
    for n_rows in (4, 32, 128):
        for label, lengths in (
            ("static", np.full(n_rows, 12)),  # a static batch: every row at one position
            ("mixed", rng.integers(0, 30, n_rows)),  # a running batch: rows at their own positions
        ):
            print(case(sessions, n_rows, lengths.astype(np.int64), args.rounds, rng), label)


if __name__ == "__main__":
    main()
