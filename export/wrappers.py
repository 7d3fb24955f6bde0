"""nn.Module wrappers that present the Transformer's encoder and decoder step as flat-tensor graphs for export.

The network's cache is a tuple of per-layer (K, V) pairs; ONNX graphs take and return flat tensor lists.
These wrappers only flatten and unflatten, in the order that ``model.signature`` declares
(``key_0, value_0, key_1, ...``), so the exported graphs compute exactly what ``Transformer`` computes.
"""

from __future__ import annotations

from torch import Tensor, nn

from model.transformer import KV, Transformer, best_candidates


def flatten_kv(pairs: tuple[KV, ...]) -> tuple[Tensor, ...]:
    return tuple(t for kv in pairs for t in kv)


def pair_kv(flat: tuple[Tensor, ...]) -> tuple[KV, ...]:
    return tuple((flat[i], flat[i + 1]) for i in range(0, len(flat), 2))


class EncoderGraph(nn.Module):
    """src_ids, src_pad_mask → each decoder layer's cross-attention K/V, flattened."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, src_ids: Tensor, src_pad_mask: Tensor) -> tuple[Tensor, ...]:
        memory = self.model.encode(src_ids, src_pad_mask)  # (B, S, D)
        return flatten_kv(self.model.cross_kv(memory))  # each (B, H, S, Dh)


class DecoderStepGraph(nn.Module):
    """One decoder step that returns each row's best candidates, not the vocabulary-wide table.

    Inputs: tokens (N, 1), positions (N, 1) (each row's own decoding position and past length), top_k (k,)
    (only its length is read: the number of candidates per row), src_pad_mask (B, S), then the past K/V of
    every layer (N, H, C, Dh), right-padded (row r's past in slots [0, positions[r])), and the cross K/V of
    every layer (B, H, S, Dh). The caller reorders the past (beam search) before the call, and only when the
    order changes. Outputs: scores (N, k) and ids (N, k) (log-softmax top-k, best first), eos_log_probs (N,),
    cross_attn (N, S) float32, present K/V of every layer (N, H, C, Dh): the past with each row's new K/V at
    its position (``Transformer.step``).
    """

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model
        self.n_layers = model.config.n_decoder_layers

    def forward(
        self, tokens: Tensor, positions: Tensor, top_k: Tensor, src_pad_mask: Tensor, *caches: Tensor
    ) -> tuple[Tensor, ...]:
        past = pair_kv(caches[: 2 * self.n_layers])  # (N, H, C, Dh) each
        cross = pair_kv(caches[2 * self.n_layers :])
        log_probs, present, attn = self.model.step(tokens, positions, cross, src_pad_mask, past)
        # log_probs are float32 already (the network upcasts before log-softmax); so is the attention here.
        # squeeze, not [:, 0]: a select exports as a Gather that copies the (N, V) table; Squeeze is free.
        scores, ids, eos = best_candidates(log_probs.squeeze(1), top_k.shape[0], self.model.config.eos_id)
        return (scores, ids, eos, attn.squeeze(1).float(), *flatten_kv(present))
