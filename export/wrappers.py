"""nn.Module wrappers that present the Transformer's encoder and decoder step as flat-tensor graphs for export.

The network's cache is a tuple of per-layer (K, V) pairs; ONNX graphs take and return flat tensor lists.
These wrappers only flatten and unflatten, in the order that ``export.signature`` declares
(``key_0, value_0, key_1, ...``), so the exported graphs compute exactly what ``Transformer`` computes.
"""

from __future__ import annotations

from torch import Tensor, nn

from model.transformer import KV, Transformer, reorder_cache


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
    """One decoder step with the beam reorder applied to the past inside the graph.

    Inputs: tokens (N, 1), step (1,), reorder (N,), src_pad_mask (N, S), then the past K/V of every layer
    (P_rows, H, T, Dh) and the cross K/V of every layer (N, H, S, Dh).
    Outputs: log_probs (N, V) float32, cross_attn (N, S) float32, present K/V of every layer (N, H, T+1, Dh).
    """

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model
        self.n_layers = model.config.n_decoder_layers

    def forward(
        self, tokens: Tensor, step: Tensor, reorder: Tensor, src_pad_mask: Tensor, *caches: Tensor
    ) -> tuple[Tensor, ...]:
        past = reorder_cache(pair_kv(caches[: 2 * self.n_layers]), reorder)  # (N, H, T, Dh) each
        cross = pair_kv(caches[2 * self.n_layers :])
        log_probs, present, attn = self.model.decode_step(tokens, step, cross, src_pad_mask, past)
        # log_probs are float32 already (the network upcasts before log-softmax); so is the attention here.
        return (log_probs[:, 0], attn[:, 0].float(), *flatten_kv(present))
