"""onnxruntime sessions of an exported model and the step functions that ``model.search`` drives (no torch).

- :class:`OrtModel` holds one variant's encoder and decoder sessions, checked against ``model.signature``.
- :class:`OrtStepFunction` implements the search's step-function contract on host (numpy) buffers: the
  self-attention cache is one right-padded buffer per K/V tensor (``model.signature``), bound through IO
  binding as both the past and the present, so each step writes its new K/V in place; the buffer is
  gathered with the search's reorder index (into a second buffer) unless that is the identity, and grown by
  ``CAPACITY_STEP`` slots when full. The cross-attention K/V are fed once per sentence, shared by its beams
  (the rows of a static batch come in equal blocks per sentence), and gathered only when sentences finish.
- :class:`IoBindingStepFunction` is the same with every K/V tensor kept on the session's device (CUDA)
  between steps; only tokens, positions and masks go in, candidates and attention out.
- :class:`StepBinding` keeps one IO binding across a running batch's calls (``model.continuous``): the cache
  and cross K/V are bound again only when they change.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from model.config import ModelConfig
from model.model_dir import read_model_dir
from model.search import StepOutput, is_identity, sentence_blocks
from model.signature import (
    CAPACITY_STEP,
    MAX_CANDIDATES,
    VARIANTS,
    GraphSignature,
    decoder_signature,
    encoder_signature,
    kv_names,
)

CPU = ("CPUExecutionProvider",)
OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
# Graph fusions left out of CPU-only sessions because their fused kernel is slower there than the ops it
# replaces. onnxruntime 1.32's CPU SkipLayerNormalization takes 171 us for (128, 1, 256) where Add +
# LayerNormalization take 31 us (1 thread; 6x at 2 threads too): without the fusion a beam-4 decode of
# 320 test2016 sentences in batches of 32 runs in 3.44 s instead of 3.64 s. CUDA keeps it.
CPU_SLOW_FUSIONS = ("SkipLayerNormFusion",)
# Cache tensors of at least this many elements are written in place (IO binding); smaller ones (batch-1 beams)
# go through a plain run, whose fresh present arrays cost less than the binding's fixed cost.
IN_PLACE_MIN = 1 << 15


def disabled_fusions(providers: Sequence[str]) -> list[str]:
    """The graph fusions to turn off for a session on ``providers``: the slow CPU ones, unless on a GPU."""
    names = [p[0] if isinstance(p, tuple) else p for p in providers]  # a provider may come with its options
    on_gpu = any(name in ("CUDAExecutionProvider", "TensorrtExecutionProvider") for name in names)
    return [] if on_gpu else list(CPU_SLOW_FUSIONS)


class OrtModelError(ValueError):
    """ONNX files that are missing or do not match the declared signature; the message says what to re-run."""


def session_options(intra_op_threads: int = 0, optimization: str = "all", spin: bool = False) -> ort.SessionOptions:
    """Session options chosen for decoding one step at a time, with the search running between steps.

    ``intra_op_threads`` parallelises inside each op (the MatMuls); 0 leaves onnxruntime's default, one
    thread per physical core; give fewer when several engines share a machine. A step is a chain of
    small dependent ops, so there is nothing for inter-op parallelism to run: execution is sequential.
    ``spin`` off: idle worker threads sleep instead of busy-waiting for the next op, so they leave the
    cores to the numpy search between steps (and to other processes); on a busy 2-core machine this
    doubled ORT fp32 throughput of the small preset. ``optimization`` "all" adds layout and fusion
    passes (LayerNorm, MatMul+Add, attention subgraphs) to constant folding (about 10% faster than
    "extended" there); graphs are optimised when a session is created, so one file serves every provider.
    """
    if optimization not in OPTIMIZATION_LEVELS:
        raise ValueError(f"unknown optimization level {optimization!r}; choose one of {sorted(OPTIMIZATION_LEVELS)}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = OPTIMIZATION_LEVELS[optimization]
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return options


def _check_signature(session: ort.InferenceSession, signature: GraphSignature, path: Path) -> None:
    got_in = [i.name for i in session.get_inputs()]
    got_out = [o.name for o in session.get_outputs()]
    if got_in != signature.input_names or got_out != signature.output_names:
        raise OrtModelError(
            f"{path} does not match the declared {signature.name} signature (inputs {got_in}, outputs {got_out}; "
            f"expected {signature.input_names} → {signature.output_names}): re-export with `mt-export --force`"
        )
    for value, spec in zip(session.get_inputs(), signature.inputs, strict=True):
        # Named axes must be the declared ones: a graph from an older export (e.g. cross K/V per row, not
        # per sentence) has the same names but would be fed shapes it cannot take.
        axes = list(value.shape)
        if len(axes) != len(spec.axes) or any(
            (isinstance(got, str) or isinstance(want, str)) and got != want  # a name, or a number fixed for one
            for got, want in zip(axes, spec.axes, strict=True)
            if got is not None
        ):
            raise OrtModelError(
                f"{path} is from an older export: its input {spec.name} has axes {axes}, this version "
                f"declares {list(spec.axes)}: re-export with `mt-export --force`"
            )


class OrtModel:
    """One variant's encoder and decoder sessions, and the model config they were exported from."""

    def __init__(
        self, encoder: ort.InferenceSession, decoder: ort.InferenceSession, config: ModelConfig, variant: str
    ) -> None:
        self.encoder = encoder
        self.decoder = decoder
        self.config = config
        self.variant = variant
        self.encoder_signature = encoder_signature(config)
        self.decoder_signature = decoder_signature(config)
        past_type = decoder.get_inputs()[self.decoder_signature.input_names.index("past_key_0")].type
        self.cache_dtype = np.dtype(_NUMPY_TYPES[past_type])
        self.past_names = kv_names("past", config.n_decoder_layers)
        self.cross_names = kv_names("cross", config.n_decoder_layers)
        self._gather_session: ort.InferenceSession | None = None
        self._grow_session: ort.InferenceSession | None = None

    @classmethod
    def from_files(
        cls,
        encoder_path: str | Path,
        decoder_path: str | Path,
        config: ModelConfig,
        variant: str = "fp32",
        providers: Sequence[str] = CPU,
        options: ort.SessionOptions | None = None,
    ) -> OrtModel:
        options = options or session_options()
        sessions = []
        for path, signature in ((encoder_path, encoder_signature(config)), (decoder_path, decoder_signature(config))):
            path = Path(path)
            if not path.is_file():
                flag = "" if variant == "fp32" else f" --{variant}"
                raise OrtModelError(f"{path} is missing: run `mt-export {path.parent.parent}{flag} --force`")
            session = ort.InferenceSession(
                str(path),
                sess_options=options,
                providers=list(providers),
                disabled_optimizers=disabled_fusions(providers),
            )
            _check_signature(session, signature, path)
            sessions.append(session)
        return cls(sessions[0], sessions[1], config, variant)

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        variant: str = "fp32",
        providers: Sequence[str] = CPU,
        options: ort.SessionOptions | None = None,
    ) -> OrtModel:
        """The ``variant`` ("fp32", "int8", "fp16") of ``model_dir/onnx/``, with the config from model.json."""
        if variant not in VARIANTS:
            raise OrtModelError(f"unknown ONNX variant {variant!r}; choose one of {sorted(VARIANTS)}")
        info = read_model_dir(model_dir)
        enc_file, dec_file, _ = VARIANTS[variant]
        onnx_dir = info.path / "onnx"
        return cls.from_files(onnx_dir / enc_file, onnx_dir / dec_file, info.config, variant, providers, options)

    def encode(self, src_ids: np.ndarray, src_pad_mask: np.ndarray) -> list[np.ndarray]:
        """Each decoder layer's cross K/V, flattened (key_0, value_0, ...), each (B, H, S, Dh)."""
        feeds = {"src_ids": np.asarray(src_ids, dtype=np.int64), "src_pad_mask": np.asarray(src_pad_mask, dtype=bool)}
        return self.encoder.run(None, feeds)

    def step_function(self, src_ids: np.ndarray, src_pad_mask: np.ndarray) -> OrtStepFunction:
        return OrtStepFunction(self, src_ids, src_pad_mask)

    def run_step(
        self, feeds: dict[str, np.ndarray], past: Sequence[np.ndarray], cross: Sequence[np.ndarray]
    ) -> tuple[StepOutput, list[np.ndarray]]:
        """One decoder call on host buffers: ``feeds`` (tokens, positions, top_k, src_pad_mask), the right-padded
        ``past`` buffers (C-contiguous) and the ``cross`` K/V → the step's outputs and the present buffers.

        Each past buffer is bound as its present too (IO binding), so the step's K/V are written into it in
        place and the presents are the same arrays. Caches under ``IN_PLACE_MIN`` elements per tensor go through
        a plain ``run`` instead (fresh present arrays): the binding's fixed cost (~60 us a call) is more than
        the copy it saves there (4 rows x 16 slots: 758 vs 695 us a call; 32 x 24: 3.9 vs 4.5 ms)."""
        positions = feeds["positions"]
        if positions.size and int(positions.max()) >= past[0].shape[2]:
            raise ValueError(
                f"the cache holds {past[0].shape[2]} slots per row and a row is at position {int(positions.max())}: "
                "grow the cache before the step (capacity > every position)"
            )
        if past[0].size < IN_PLACE_MIN:
            run_feeds = {**feeds, **dict(zip(self.past_names + self.cross_names, [*past, *cross], strict=True))}
            scores, ids, eos, cross_attn, *present = self.decoder.run(None, run_feeds)
            return StepOutput(scores, ids, eos, cross_attn), present
        past_values = [ort.OrtValue.ortvalue_from_numpy(_contiguous(a)) for a in past]  # shares the numpy memory
        cross_values = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a)) for a in cross]
        return self.run_in_place(feeds, past_values, cross_values), list(past)

    def run_in_place(
        self, feeds: dict[str, np.ndarray], past: Sequence[ort.OrtValue], cross: Sequence[ort.OrtValue]
    ) -> StepOutput:
        """One decoder call with the cache as OrtValues (host or device): each ``past`` value bound as its present
        too, so the step writes its K/V into it; ``feeds`` go in from the host and the outputs come back there."""
        return StepBinding(self).run(feeds, past, cross)

    def empty_cache(self, n_rows: int, capacity: int = CAPACITY_STEP) -> list[np.ndarray]:
        """Right-padded self-attention K/V buffers for every layer, (n_rows, H, capacity, Dh) of zeros: no row
        has a past yet (positions 0), so the first step runs the same graph as every other."""
        shape = (n_rows, self.config.n_heads, capacity, self.config.head_dim)
        return [np.zeros(shape, dtype=self.cache_dtype) for _ in self.past_names]

    def gather_session(self) -> ort.InferenceSession:
        """A Gather graph on the decoder's provider, to reorder K/V where they live (on the device)."""
        if self._gather_session is None:
            self._gather_session = self._device_session(_gather_graph(len(self.cross_names), self.cache_dtype))
        return self._gather_session

    def grow_session(self) -> ort.InferenceSession:
        """A Pad graph on the decoder's provider, to add zero slots to the K/V buffers where they live."""
        if self._grow_session is None:
            self._grow_session = self._device_session(_grow_graph(len(self.past_names), self.cache_dtype))
        return self._grow_session

    def _device_session(self, graph: bytes) -> ort.InferenceSession:
        providers = self.decoder.get_providers()
        provider_options = [self.decoder.get_provider_options()[p] for p in providers]
        return ort.InferenceSession(graph, providers=providers, provider_options=provider_options)


class StepBinding:
    """The decoder's IO binding kept across the calls of a running batch (``model.continuous``): the past K/V
    (bound as the presents too, so each call writes its K/V in place) and the cross K/V are bound again only
    when other values are given; each call binds its feeds and host arrays made for its four outputs, which it
    returns (no output OrtValues to unwrap). The bound feeds and outputs are only read during :meth:`run`: every
    call binds its own before running."""

    def __init__(self, model: OrtModel) -> None:
        self.model = model
        self.binding = model.decoder.io_binding()
        self.bound: tuple[Sequence[ort.OrtValue], Sequence[ort.OrtValue]] | None = None
        outputs = model.decoder_signature.outputs[:4]  # scores, ids, eos_log_probs, cross_attn (the pinned types)
        self.out_names = [spec.name for spec in outputs]
        self.out_types = [np.dtype(spec.dtype) for spec in outputs]

    def run(
        self, feeds: dict[str, np.ndarray], past: Sequence[ort.OrtValue], cross: Sequence[ort.OrtValue]
    ) -> StepOutput:
        """One call on host buffers: ``feeds`` as :meth:`OrtModel.run_step`'s; ``past`` and ``cross`` the
        same objects as the last call's unless they changed (compared by identity)."""
        model, binding = self.model, self.binding
        if self.bound is None or self.bound[0] is not past or self.bound[1] is not cross:
            for name, value in zip(model.past_names + model.cross_names, [*past, *cross], strict=True):
                binding.bind_ortvalue_input(name, value)
            for name, value in zip(model.decoder_signature.output_names[4:], past, strict=True):
                binding.bind_ortvalue_output(name, value)  # present_* = past_*: in place
            self.bound = (past, cross)
        for name, array in feeds.items():
            binding.bind_cpu_input(name, array)
        rows, k, width = feeds["tokens"].shape[0], feeds["top_k"].shape[0], feeds["src_pad_mask"].shape[1]
        shapes = ((rows, k), (rows, k), (rows,), (rows, width))
        outputs = [np.empty(shape, dtype) for shape, dtype in zip(shapes, self.out_types, strict=True)]
        for name, array in zip(self.out_names, outputs, strict=True):
            binding.bind_output(name, "cpu", 0, array.dtype, array.shape, array.ctypes.data)
        model.decoder.run_with_iobinding(binding)
        return StepOutput(*outputs)


class RowGather:
    """``np.take(array, index, axis=0)`` for every K/V tensor of a step, into host buffers reused between calls.

    A decoder step gathers every K/V tensor along its rows (beam reorder, finished sentences dropped); a fresh
    array each time costs page faults on top of the copy (about half the gather's time for the cache sizes of
    beam search). Each ``slot`` (one per K/V tensor) keeps at most two buffers, grown as needed; a result is
    written to one that does not overlap the source, so gathering from a slot's own previous result is safe.
    A result stays valid until the next call for its slot that does not read from it. Results under
    ``small`` elements (batch-1 beams) are plain ``np.take`` arrays: allocator pages are reused at that size,
    and the buffers' bookkeeping cost more than the copy (64 vs 12 us for six (4, 4, 12, 64) tensors).
    """

    def __init__(self, small: int = 1 << 15) -> None:
        self.small = small  # elements: 128 KiB of float32, glibc's default threshold for fresh (page-faulting) mmaps
        self._buffers: dict[object, list[np.ndarray]] = {}

    def __call__(self, slot: object, array: np.ndarray, index: np.ndarray) -> np.ndarray:
        _check_rows(index, array.shape[0])
        return self._take(slot, array, index)

    def many(
        self,
        name: object,
        arrays: Sequence[np.ndarray],
        index: np.ndarray | None,
        zeros: int = 0,
        capacity: int | None = None,
    ) -> list[np.ndarray]:
        """The rows ``index`` of each array (array i in slot ``(name, i)``; None: every row, in order), the index
        checked once for all; ``zeros`` more rows of zeros after them (room for rows that join, in the same copy).
        ``capacity``: the result's third axis (a right-padded cache's slots): cut, or widened in the same copy
        (the new slots hold whatever the reused buffer held: a cache never reads a slot before writing it)."""
        if index is not None:
            _check_rows(index, min((a.shape[0] for a in arrays), default=0))
        return [self._take((name, i), array, index, zeros, capacity) for i, array in enumerate(arrays)]

    def _take(
        self, slot: object, array: np.ndarray, index: np.ndarray | None, zeros: int = 0, capacity: int | None = None
    ) -> np.ndarray:
        n = array.shape[0] if index is None else index.size
        if capacity is not None and capacity < array.shape[2]:
            array = array[:, :, :capacity]  # a view: np.take copies it first (rare: a cache that shrinks)
        shape = (n + zeros, *array.shape[1:])
        if capacity is not None:
            shape = (*shape[:2], capacity, *shape[3:])
        size = math.prod(shape)
        widened = shape[2:] != array.shape[2:]
        if size < self.small and not widened and not zeros and index is not None:
            return np.take(array, index, axis=0, mode="clip")  # the range was checked by the caller
        if size < self.small:
            out = np.zeros(shape, dtype=array.dtype)
        else:
            pool = self._buffers.setdefault(slot, [])
            free = [b for b in pool if b.dtype == array.dtype and not np.may_share_memory(b, array)]
            buffer = next((b for b in free if b.size >= size), None)
            if buffer is None:
                buffer = np.empty(size + size // 2, dtype=array.dtype)  # room to grow by a few steps
                pool[:] = [b for b in pool if np.may_share_memory(b, array)][:1] + [buffer]
            out = buffer[:size].reshape(shape)
            out[n:] = 0
        if widened:  # numpy gathers into a temporary first (+35%, every few steps)
            out[:n, :, : array.shape[2]] = array if index is None else array[index]
        elif index is None:
            out[:n] = array
        else:  # mode="clip" lets numpy write straight into `out` ("raise" would buffer); the range was checked
            np.take(array, index, axis=0, out=out[:n], mode="clip")
        return out


def _contiguous(array: np.ndarray) -> np.ndarray:
    if not (array.flags.c_contiguous and array.flags.writeable):  # else the in-place write would go astray
        raise ValueError("a cache buffer bound in place must be C-contiguous and writeable")
    return array


def _check_rows(index: np.ndarray, n_rows: int) -> None:
    if index.size and (index.min() < 0 or index.max() >= n_rows):  # RowGather's mode="clip" would hide it
        raise IndexError(f"row index out of range for {n_rows} rows: {index.min()}..{index.max()}")


class OrtStepFunction:
    """Step function over host buffers: ``(tokens (N,), step, reorder (N,) | None, k) → StepOutput``.

    The self-attention K/V live in right-padded buffers (N, H, C, Dh), every row's past in slots [0, step):
    the decoder writes each step's K/V at slot ``step`` of the same buffers (IO binding binds each present
    to its past), so a step copies nothing unless the rows change. ``reorder`` gathers the buffers (into
    others, the previous ones kept for the next gather), not at all when it is the identity (greedy search,
    beams that keep their places); a full buffer grows by ``CAPACITY_STEP`` slots. The cross K/V go in per
    sentence while the rows come in equal blocks per sentence (``sentence_blocks``): the beams' expansion
    gathers nothing, a finished sentence drops one entry, not beam_size copies.
    """

    def __init__(self, model: OrtModel, src_ids: np.ndarray, src_pad_mask: np.ndarray) -> None:
        self.model = model
        self.base_mask = np.asarray(src_pad_mask, dtype=bool)
        self.base_cross = self._encode(np.asarray(src_ids, dtype=np.int64))  # each (B, H, S, Dh)
        self.row_sentence = np.arange(self.base_mask.shape[0])  # the sentence of each current row
        self.fed = self.row_sentence  # the sentence of each cross K/V entry fed (the rows in blocks, one per entry)
        self.rows = RowGather()
        self.cross = self.base_cross
        self.mask = self.base_mask
        self.past = self._empty_past(self.base_mask.shape[0])

    def __call__(self, tokens: np.ndarray, step: int, reorder: np.ndarray | None, k: int) -> StepOutput:
        tokens = np.asarray(tokens, dtype=np.int64)
        if k > MAX_CANDIDATES:
            raise ValueError(
                f"the decoder graph returns at most {MAX_CANDIDATES} candidates per row, {k} asked: use a smaller beam"
            )
        capacity = self._capacity()
        if step >= capacity:  # no free slot for this step's K/V: more room, in the gather if there is one
            capacity = step + CAPACITY_STEP
        if reorder is not None and not is_identity(reorder, len(self.row_sentence)):
            reorder = np.asarray(reorder, dtype=np.int64)
            self.past = self._gather("past", self.past, reorder, capacity)
            row_sentence = self.row_sentence[reorder]
            if not np.array_equal(row_sentence, self.row_sentence):  # expansion or finished sentences
                self._feed_sentences(row_sentence)
        elif capacity > self._capacity():
            self.past = self._grow(self.past, capacity)
        n_rows = tokens.shape[0]
        feeds = {
            "tokens": tokens[:, None],  # (N, 1)
            "positions": np.full((n_rows, 1), step, dtype=np.int64),  # (N, 1): each row's past fills [0, step)
            "top_k": np.zeros(min(k, self.model.config.vocab_size), dtype=np.int64),  # (k,)
            "src_pad_mask": self.mask,  # (B, S): B sentences, or one per row
        }
        return self._run(feeds)

    def _feed_sentences(self, row_sentence: np.ndarray) -> None:
        """The cross K/V and source mask for rows of these sentences: one per sentence when the rows come in
        equal blocks per sentence (beams share it; none gathered while the live sentences stay the same),
        else one per row."""
        fed = sentence_blocks(row_sentence)
        fed = row_sentence if fed is None else fed
        if not np.array_equal(fed, self.fed):
            identity = is_identity(fed, self.base_mask.shape[0])
            self.cross = self.base_cross if identity else self._gather("cross", self.base_cross, fed)
            self.mask = self.base_mask[fed]
            self.fed = fed
        self.row_sentence = row_sentence

    def _encode(self, src_ids: np.ndarray) -> list:
        return self.model.encode(src_ids, self.base_mask)

    def _empty_past(self, n_rows: int) -> list:
        return self.model.empty_cache(n_rows)

    def _capacity(self) -> int:
        return self.past[0].shape[2]

    def _gather(self, name: str, values: list, index: np.ndarray, capacity: int | None = None) -> list:
        return self.rows.many(name, values, index, capacity=capacity)

    def _grow(self, values: list, capacity: int) -> list:
        return self.rows.many("past", values, None, capacity=capacity)

    def _run(self, feeds: dict[str, np.ndarray]) -> StepOutput:
        past = self.past
        out, self.past = self.model.run_step(feeds, past, self.cross)
        # The past/cross arrays join the feeds for callers that record them (int8 calibration).
        feeds.update(zip(self.model.past_names, past, strict=True))
        feeds.update(zip(self.model.cross_names, self.cross, strict=True))
        return out


class IoBindingStepFunction(OrtStepFunction):
    """The same contract with every K/V tensor on the device: the cache buffers never leave it.

    ``device`` is onnxruntime's device name for the sessions' provider ("cuda"; "cpu" works too, for
    tests). The cross K/V are computed once on the device; past and cross K/V are re-gathered there (a
    small Gather graph) when the rows change, and the cache grown there (a Pad graph). Per step only tokens,
    positions and masks are copied in (bytes per row) and the candidates and attention copied out, as the
    search needs them on the host.
    """

    def __init__(
        self, model: OrtModel, src_ids: np.ndarray, src_pad_mask: np.ndarray, device: str = "cuda", device_id: int = 0
    ) -> None:
        self.device, self.device_id = device, device_id
        super().__init__(model, src_ids, src_pad_mask)

    def _encode(self, src_ids: np.ndarray) -> list:
        binding = self.model.encoder.io_binding()
        binding.bind_cpu_input("src_ids", src_ids)
        binding.bind_cpu_input("src_pad_mask", self.base_mask)
        for name in self.model.encoder_signature.output_names:
            binding.bind_output(name, self.device, self.device_id)
        self.model.encoder.run_with_iobinding(binding)
        return binding.get_outputs()  # OrtValues on the device

    def _empty_past(self, n_rows: int) -> list:
        empty = self.model.empty_cache(n_rows)
        return [ort.OrtValue.ortvalue_from_numpy(e, self.device, self.device_id) for e in empty]

    def _capacity(self) -> int:
        return self.past[0].shape()[2]

    def _gather(self, name: str, values: list, index: np.ndarray, capacity: int | None = None) -> list:
        gathered = self._gather_rows(values, index)
        return gathered if capacity is None or capacity == self._capacity() else self._grow(gathered, capacity)

    def _gather_rows(self, values: list, index: np.ndarray) -> list:
        session = self.model.gather_session()
        binding = session.io_binding()
        binding.bind_cpu_input("index", index.astype(np.int64))
        for i, value in enumerate(values):
            binding.bind_ortvalue_input(f"x{i}", value)
            binding.bind_output(f"y{i}", self.device, self.device_id)
        session.run_with_iobinding(binding)
        return binding.get_outputs()

    def _grow(self, values: list, capacity: int) -> list:
        session = self.model.grow_session()
        binding = session.io_binding()
        binding.bind_cpu_input("pads", np.array([0, 0, 0, 0, 0, 0, capacity - self._capacity(), 0], dtype=np.int64))
        for i, value in enumerate(values):
            binding.bind_ortvalue_input(f"x{i}", value)
            binding.bind_output(f"y{i}", self.device, self.device_id)
        session.run_with_iobinding(binding)
        return binding.get_outputs()

    def _run(self, feeds: dict[str, np.ndarray]) -> StepOutput:
        return self.model.run_in_place(feeds, self.past, self.cross)  # the cache written in place on the device


def _gather_graph(n_tensors: int, dtype: np.dtype) -> bytes:
    """ONNX bytes of ``y_i = Gather(x_i, index, axis=0)`` for ``n_tensors`` tensors of rank 4."""
    return _per_tensor_graph("Gather", ("index", ["n"]), {"axis": 0}, n_tensors, dtype)


def _grow_graph(n_tensors: int, dtype: np.dtype) -> bytes:
    """ONNX bytes of ``y_i = Pad(x_i, pads)`` (zeros) for ``n_tensors`` tensors of rank 4."""
    return _per_tensor_graph("Pad", ("pads", [8]), {}, n_tensors, dtype)


def _per_tensor_graph(op: str, extra: tuple[str, list], attributes: dict, n_tensors: int, dtype: np.dtype) -> bytes:
    """ONNX bytes of ``y_i = op(x_i, extra)`` for ``n_tensors`` tensors of rank 4 (``extra`` an int64 input)."""
    from onnx import TensorProto, helper  # only the device path needs it

    elem = helper.np_dtype_to_tensor_dtype(dtype)
    name, extra_shape = extra
    graph = helper.make_graph(
        [helper.make_node(op, [f"x{i}", name], [f"y{i}"], **attributes) for i in range(n_tensors)],
        f"per_tensor_{op.lower()}",
        [helper.make_tensor_value_info(name, TensorProto.INT64, extra_shape)]
        + [helper.make_tensor_value_info(f"x{i}", elem, ["a", "b", "c", "d"]) for i in range(n_tensors)],
        [helper.make_tensor_value_info(f"y{i}", elem, ["e", "f", "g", "h"]) for i in range(n_tensors)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    return model.SerializeToString()
