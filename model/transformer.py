"""The encoder-decoder Transformer of "Attention Is All You Need" (torch), with an explicit decoder cache.

One forward contract serves training, export and the parity tests:

- ``encode(src_ids, src_pad_mask) -> memory``
- ``decode_step(tokens, positions, memory_or_cross_kv, src_pad_mask, cache)
  -> (log_probs, new_cache, cross_attn)``

- ``step(tokens, positions, cross_kv, src_pad_mask, cache) -> (log_probs, present, cross_attn)``

Training runs ``decode_step`` over the whole target with an empty cache (the causal mask does the rest).
Incremental decoding (the exported step graph, the torch step function) runs ``step``: one token per row,
each row at its own position, over a right-padded cache of per-layer K/V buffers (N, H, C, Dh) whose slot
``position`` the step fills; its self-attention exports as onnxruntime's GroupQueryAttention. Both give the
same values (the parity tests). The cache is a plain value, never state hidden in modules, so a beam
reorder is an index gather (``reorder_cache``). Mask convention everywhere: ``True`` = padding / not allowed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import ModelConfig
from model.signature import MAX_CANDIDATES

KV = tuple[Tensor, Tensor]  # keys, values: each (N, H, T, Dh)
DecoderCache = tuple[KV, ...]  # one self-attention KV per decoder layer
CrossKV = tuple[KV, ...]  # one cross-attention KV per decoder layer, computed once from memory


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Inverted dropout: each element kept with probability 1 - p and scaled by 1 / (1 - p), in training only.

    On CPU the keep mask comes from uniform 16-bit lanes of 64-bit random words (a quarter of the draws of one
    number per element; p is rounded to a multiple of 1/65536) instead of ``F.dropout``'s Bernoulli draws, which
    were 31% of a training step of the bundled recipe on this CPU (py-spy). Forward and backward of a (150, 20,
    1024) activation, 2 threads: 36.4 ms with ``F.dropout``, 14.7 ms with a ``torch.rand`` mask, 7.6 ms so (bf16:
    30.8, 15.4, 10.4). Same distribution, another use of the generator: runs are reproducible and resume exactly,
    but draw other masks than ``F.dropout`` would. On CUDA the fused ``F.dropout`` stays."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, True)
    words = torch.randint(-(2**63), 2**63 - 1, (-(-x.numel() // 4),), dtype=torch.int64)  # 4 lanes of 16 bits each
    lanes = words.view(torch.int16)[: x.numel()].view(x.shape)  # uniform over [-32768, 32767]
    keep = lanes.ge(round(p * 65536) - 32768)  # P(keep) = 1 - round(p * 65536) / 65536
    return x * keep.to(x.dtype).mul_(1.0 / (1.0 - p))


def sinusoidal_table(max_positions: int, d_model: int, layout: str = "interleaved") -> Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(...), as in section 3.5 ("interleaved");
    "halves" puts the same sines in the first half of the vector and the cosines in the second (Marian)."""
    position = torch.arange(max_positions, dtype=torch.float32)[:, None]
    inv_freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    sin, cos = torch.sin(position * inv_freq), torch.cos(position * inv_freq[: d_model // 2])
    if layout == "halves":
        return torch.cat([sin, cos], dim=1)  # (P, D): [sin | cos]
    table = torch.zeros(max_positions, d_model)
    table[:, 0::2] = sin
    table[:, 1::2] = cos
    return table


ACTIVATIONS = {"relu": F.relu, "swish": F.silu, "gelu": F.gelu}


class MultiHeadAttention(nn.Module):
    """Multi-head scaled dot-product attention with separate q/k/v/out projections (the paper's W^Q, W^K, W^V, W^O).

    The parameters stay four ``nn.Linear``; the forward passes run one matmul for q, k and v together
    (``project_qkv``) or k and v together (``project_kv``), with the weights concatenated on the fly, so the
    exported graph has one bigger MatMul instead of three (constant folding turns the concatenation of
    weights into one initializer) and checkpoints keep their layout.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def split_heads(self, x: Tensor) -> Tensor:
        n, t, _ = x.shape
        return x.view(n, t, self.n_heads, self.head_dim).transpose(1, 2)  # (N, H, T, Dh)

    def _joint(self, x: Tensor, projections: tuple[nn.Linear, ...]) -> tuple[Tensor, ...]:
        """x (N, T, D) through several projections as one matmul → each (N, T, D), heads not split."""
        weight = torch.cat([p.weight for p in projections])  # (len * D, D)
        bias = torch.cat([p.bias for p in projections])
        return F.linear(x, weight, bias).split(self.n_heads * self.head_dim, dim=-1)

    def _fused(self, x: Tensor, projections: tuple[nn.Linear, ...]) -> tuple[Tensor, ...]:
        return tuple(self.split_heads(y) for y in self._joint(x, projections))

    def project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (N, T, D) → q, k, v, each (N, H, T, Dh), from one matmul."""
        q, k, v = self._fused(x, (self.q_proj, self.k_proj, self.v_proj))
        return q, k, v

    def project_kv(self, x: Tensor) -> KV:
        k, v = self._fused(x, (self.k_proj, self.v_proj))
        return k, v

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """q (N, H, T, Dh), k/v (N, H, S, Dh), mask broadcastable to (N, H, T, S) → (N, T, D), (N, H, T, S)."""
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # (N, H, T, S)
        scores = scores.masked_fill(mask, torch.finfo(scores.dtype).min)
        weights = torch.softmax(scores, dim=-1)
        context = torch.matmul(dropout(weights, self.dropout, self.training), v)  # (N, H, T, Dh)
        n, _, t, _ = context.shape
        context = context.transpose(1, 2).reshape(n, t, self.n_heads * self.head_dim)  # (N, T, D)
        return self.out_proj(context), weights

    def attend_cached(
        self, x: Tensor, past_k: Tensor, past_v: Tensor, lengths: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Self-attention of one new position per row over a right-padded cache: x (N, 1, D); past_k/past_v
        (N, H, C, Dh) hold row r's past in slots [0, lengths[r]) (the rest is ignored); lengths (N,) int64.
        Returns (N, 1, D) and the present K/V: the past with the row's new K/V written at slot lengths[r].

        Exported as onnxruntime's ``com.microsoft.GroupQueryAttention`` (kv heads = heads): each row attends
        to its own ``lengths[r] + 1`` slots only, and when the caller binds the present to the past's buffer
        the new K/V are written in place (no copy of the cache per step). Eagerly, the same in torch ops."""
        n = x.shape[0]
        q, k, v = self._joint(x, (self.q_proj, self.k_proj, self.v_proj))  # (N, 1, D) each
        if torch.onnx.is_in_onnx_export():
            out, present_k, present_v = torch.onnx.ops.symbolic_multi_out(
                "com.microsoft::GroupQueryAttention",
                (q, k, v, past_k, past_v, lengths.to(torch.int32), (lengths.max() + 1).to(torch.int32)),
                {"num_heads": self.n_heads, "kv_num_heads": self.n_heads},
                dtypes=(q.dtype, past_k.dtype, past_v.dtype),
                shapes=(q.shape, past_k.shape, past_v.shape),
                version=1,
            )
            return self.out_proj(out), present_k, present_v
        rows = torch.arange(n, device=x.device)
        present_k, present_v = past_k.clone(), past_v.clone()
        present_k[rows, :, lengths] = k.view(n, self.n_heads, self.head_dim).to(past_k.dtype)
        present_v[rows, :, lengths] = v.view(n, self.n_heads, self.head_dim).to(past_v.dtype)
        unseen = torch.arange(past_k.shape[2], device=x.device)[None, :] > lengths[:, None]  # (N, C)
        context, _ = self.attend(self.split_heads(q), present_k, present_v, unseen[:, None, None, :])
        return context, present_k, present_v

    def forward(self, query: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """query (N, T, D) attends to projected k/v (B, H, S, Dh) of B sentences, N = B x G: rows b*G .. b*G+G-1
        read sentence b (the beams of a sentence share its cross-attention K/V; G = 1: one each) → (N, T, D),
        weights (N, H, T, S). ``mask`` broadcasts to (B, H, G*T, S).

        A sentence's G rows become one query block, so its scores are one (G*T, Dh) x (Dh, S) product per head
        that reads the K/V once, where a copy per beam made G products over G copies."""
        n, t, d = query.shape
        b, h, dh = k.shape[0], self.n_heads, self.head_dim
        q = self.q_proj(query).reshape(b, -1, t, h, dh)  # (B, G, T, H, Dh)
        q = q.permute(0, 3, 1, 2, 4).reshape(b, h, -1, dh)  # (B, H, G*T, Dh)
        context, weights = self.attend(q, k, v, mask)  # (B, G*T, D), (B, H, G*T, S)
        weights = weights.reshape(b, h, -1, t, weights.shape[-1]).transpose(1, 2)  # (B, G, H, T, S)
        return context.reshape(n, t, d), weights.reshape(n, h, t, weights.shape[-1])


class FeedForward(nn.Module):
    """Position-wise FFN(x) = act(x W1 + b1) W2 + b2; act is max(0, ·) in the paper (swish, gelu for imports)."""

    def __init__(self, d_model: int, d_ff: int, activation_dropout: float, activation: str = "relu") -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff)
        self.w2 = nn.Linear(d_ff, d_model)
        self.activation_dropout = activation_dropout
        self.act = ACTIVATIONS[activation]

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(dropout(self.act(self.w1(x)), self.activation_dropout, self.training))


class SubLayer(nn.Module):
    """Residual connection around a sub-layer with LayerNorm after (post-norm, the paper) or before."""

    def __init__(self, d_model: int, dropout: float, pre_norm: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.dropout = dropout
        self.pre_norm = pre_norm

    def inp(self, x: Tensor) -> Tensor:
        return self.norm(x) if self.pre_norm else x

    def out(self, x: Tensor, sublayer_out: Tensor) -> Tensor:
        y = x + dropout(sublayer_out, self.dropout, self.training)
        return y if self.pre_norm else self.norm(y)


class EncoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.attention_dropout)
        self.ffn = FeedForward(cfg.d_model, cfg.d_ff, cfg.activation_dropout, cfg.activation)
        self.self_attn_sub = SubLayer(cfg.d_model, cfg.dropout, cfg.pre_norm)
        self.ffn_sub = SubLayer(cfg.d_model, cfg.dropout, cfg.pre_norm)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        q, k, v = self.self_attn.project_qkv(self.self_attn_sub.inp(x))
        x = self.self_attn_sub.out(x, self.self_attn.attend(q, k, v, mask)[0])
        return self.ffn_sub.out(x, self.ffn(self.ffn_sub.inp(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.attention_dropout)
        self.cross_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.attention_dropout)
        self.ffn = FeedForward(cfg.d_model, cfg.d_ff, cfg.activation_dropout, cfg.activation)
        self.self_attn_sub = SubLayer(cfg.d_model, cfg.dropout, cfg.pre_norm)
        self.cross_attn_sub = SubLayer(cfg.d_model, cfg.dropout, cfg.pre_norm)
        self.ffn_sub = SubLayer(cfg.d_model, cfg.dropout, cfg.pre_norm)

    def forward(
        self, x: Tensor, past: KV, cross: KV, self_mask: Tensor, cross_mask: Tensor
    ) -> tuple[Tensor, KV, Tensor]:
        """x (N, T, D); past K/V (N, H, P, Dh); cross K/V (B, H, S, Dh) of the rows' B sentences (N = B x G, in
        blocks of G rows per sentence) → x, present K/V (N, H, P+T, Dh), cross weights (N, H, T, S)."""
        q, k_new, v_new = self.self_attn.project_qkv(self.self_attn_sub.inp(x))
        k = torch.cat([past[0], k_new], dim=2)  # (N, H, P+T, Dh)
        v = torch.cat([past[1], v_new], dim=2)
        x = self.self_attn_sub.out(x, self.self_attn.attend(q, k, v, self_mask)[0])
        attended, cross_weights = self.cross_attn(self.cross_attn_sub.inp(x), cross[0], cross[1], cross_mask)
        x = self.cross_attn_sub.out(x, attended)
        x = self.ffn_sub.out(x, self.ffn(self.ffn_sub.inp(x)))
        return x, (k, v), cross_weights

    def step(self, x: Tensor, past: KV, lengths: Tensor, cross: KV, cross_mask: Tensor) -> tuple[Tensor, KV, Tensor]:
        """One new position per row over a right-padded cache (``MultiHeadAttention.attend_cached``): x (N, 1, D),
        past K/V (N, H, C, Dh) with row r's past in slots [0, lengths[r]) → x, present K/V, cross weights."""
        attended, k, v = self.self_attn.attend_cached(self.self_attn_sub.inp(x), past[0], past[1], lengths)
        x = self.self_attn_sub.out(x, attended)
        attended, cross_weights = self.cross_attn(self.cross_attn_sub.inp(x), cross[0], cross[1], cross_mask)
        x = self.cross_attn_sub.out(x, attended)
        x = self.ffn_sub.out(x, self.ffn(self.ffn_sub.inp(x)))
        return x, (k, v), cross_weights


class Transformer(nn.Module):
    """Encoder-decoder with one shared (tied) embedding matrix for source, target and output."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=cfg.pad_id)
        self.tgt_embed = None if cfg.tie_embeddings else nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.output_proj = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.register_buffer("pe", sinusoidal_table(cfg.max_positions, cfg.d_model, cfg.positions), persistent=False)
        self.logits_bias = nn.Parameter(torch.zeros(cfg.vocab_size)) if cfg.logits_bias else None
        self.embed_scale = math.sqrt(cfg.d_model) if cfg.scale_embedding else 1.0
        self.embed_dropout = cfg.dropout
        self.encoder_layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_encoder_layers))
        self.decoder_layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_decoder_layers))
        # Pre-norm stacks leave the residual stream un-normalised: a final LayerNorm closes each stack.
        self.encoder_norm = nn.LayerNorm(cfg.d_model) if cfg.pre_norm else nn.Identity()
        self.decoder_norm = nn.LayerNorm(cfg.d_model) if cfg.pre_norm else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        # Embeddings are scaled by sqrt(d_model) on the way in, so N(0, d^-0.5) gives unit-scale inputs
        # while the tied output projection starts with small logits.
        for emb in (self.embed, self.tgt_embed):
            if emb is not None:
                nn.init.normal_(emb.weight, mean=0.0, std=self.config.d_model**-0.5)
                with torch.no_grad():
                    emb.weight[self.config.pad_id].zero_()

    def embed_tokens(self, tokens: Tensor, positions: Tensor, target: bool) -> Tensor:
        """tokens (N, T), positions (T,) or (N, T) → (N, T, D): scaled embedding + sinusoid, then dropout."""
        table = self.tgt_embed if (target and self.tgt_embed is not None) else self.embed
        x = table(tokens) * self.embed_scale + self.pe[positions]
        return dropout(x, self.embed_dropout, self.training)

    def encode(self, src_ids: Tensor, src_pad_mask: Tensor) -> Tensor:
        """src_ids (B, S), src_pad_mask (B, S) True at padding → memory (B, S, D)."""
        positions = torch.arange(src_ids.shape[1], device=src_ids.device)
        x = self.embed_tokens(src_ids, positions, target=False)
        mask = src_pad_mask[:, None, None, :]  # (B, 1, 1, S)
        for layer in self.encoder_layers:
            x = layer(x, mask)
        return self.encoder_norm(x)

    def cross_kv(self, memory: Tensor) -> CrossKV:
        """Each decoder layer's cross-attention K/V, (B, H, S, Dh) each: computed once per sentence, every
        layer's K and V from one matmul (the weights of all layers side by side)."""
        projections = [p for layer in self.decoder_layers for p in (layer.cross_attn.k_proj, layer.cross_attn.v_proj)]
        flat = self.decoder_layers[0].cross_attn._fused(memory, tuple(projections))  # 2L tensors (B, H, S, Dh)
        return tuple((flat[i], flat[i + 1]) for i in range(0, len(flat), 2))

    def empty_cache(
        self, n: int, device: torch.device | None = None, dtype: torch.dtype | None = None, capacity: int = 0
    ) -> DecoderCache:
        """A cache of past length 0, so the first step runs the same code as every later one; ``capacity``: the
        right-padded buffers of :meth:`step` instead, (n, H, capacity, Dh) of zeros per layer K/V."""
        shape = (n, self.config.n_heads, capacity, self.config.head_dim)
        dtype = dtype or self.embed.weight.dtype
        return tuple(
            (torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
            for _ in self.decoder_layers
        )

    def decode_step(
        self,
        tokens: Tensor,
        positions: Tensor,
        memory_or_cross_kv: Tensor | CrossKV,
        src_pad_mask: Tensor,
        cache: DecoderCache | None = None,
    ) -> tuple[Tensor, DecoderCache, Tensor]:
        """Run the decoder over ``tokens`` (N, T) that follow ``cache`` (past length P): training, and the
        reference that :meth:`step` (one token per row over a right-padded cache, the exported step) must match.

        positions: (T,) absolute positions of ``tokens`` (P .. P+T-1), or (N, T), one row each.
        ``memory_or_cross_kv`` and ``src_pad_mask`` (B, S) may hold one entry per sentence for N = B x G rows
        that come in blocks of G per sentence (beams sharing their sentence's cross-attention K/V).
        Returns log-probs (N, T, V), the new cache (past length P+T) and the alignment layer's
        cross-attention averaged over heads (N, T, S).
        """
        return self._decode(tokens, positions, memory_or_cross_kv, src_pad_mask, cache, True)

    def _decode(
        self,
        tokens: Tensor,
        positions: Tensor,
        memory_or_cross_kv: Tensor | CrossKV,
        src_pad_mask: Tensor,
        cache: DecoderCache | None,
        log_probs: bool,
    ) -> tuple[Tensor, DecoderCache, Tensor]:
        n, t = tokens.shape
        if cache is None:
            cache = self.empty_cache(n, tokens.device, self.embed.weight.dtype)
        cross = self.cross_kv(memory_or_cross_kv) if isinstance(memory_or_cross_kv, Tensor) else memory_or_cross_kv
        past_len = cache[0][0].shape[2]
        # Query i (absolute position past_len + i) may see keys 0 .. past_len + i.
        key_pos = torch.arange(past_len + t, device=tokens.device)
        query_pos = torch.arange(t, device=tokens.device) + past_len
        self_mask = key_pos[None, :] > query_pos[:, None]  # (T, P+T), True = future
        cross_mask = src_pad_mask[:, None, None, :]  # (B, 1, 1, S): per sentence, as the cross K/V
        x = self.embed_tokens(tokens, positions, target=True)
        new_cache: list[KV] = []
        alignment = None
        for i, layer in enumerate(self.decoder_layers):
            x, present, cross_weights = layer(x, cache[i], cross[i], self_mask, cross_mask)
            new_cache.append(present)
            if i == self.config.alignment_layer_index:
                alignment = cross_weights.mean(dim=1)  # (N, T, S)
        logits = self.project(self.decoder_norm(x))  # (N, T, V)
        out = torch.log_softmax(logits.float(), dim=-1) if log_probs else logits
        return out, tuple(new_cache), alignment

    def step(
        self, tokens: Tensor, positions: Tensor, cross: CrossKV, src_pad_mask: Tensor, cache: DecoderCache
    ) -> tuple[Tensor, DecoderCache, Tensor]:
        """The incremental decoder step of the exported graph: one token per row at its own position.

        tokens (N, 1); positions (N, 1): each row's position, which is also its past length: row r's past
        K/V fill slots [0, positions[r]) of the right-padded ``cache`` (per layer (N, H, C, Dh), C > every
        position) and this step writes its K/V at slot positions[r]; the slots after are never read, so rows
        at different positions need no mask. ``cross`` and ``src_pad_mask`` as in :meth:`decode_step` (one per
        sentence for N = B x G rows in blocks of G). Returns log-probs (N, 1, V) float32, the present cache
        (the same layout, one more slot filled per row) and the alignment layer's head-mean cross-attention
        (N, 1, S). Same values as :meth:`decode_step` over the rows' own pasts.
        """
        lengths = positions[:, 0]  # (N,)
        cross_mask = src_pad_mask[:, None, None, :]  # (B, 1, 1, S)
        x = self.embed_tokens(tokens, positions, target=True)
        present: list[KV] = []
        alignment = None
        for i, layer in enumerate(self.decoder_layers):
            x, kv, cross_weights = layer.step(x, cache[i], lengths, cross[i], cross_mask)
            present.append(kv)
            if i == self.config.alignment_layer_index:
                alignment = cross_weights.mean(dim=1)  # (N, 1, S)
        logits = self.project(self.decoder_norm(x))  # (N, 1, V)
        return torch.log_softmax(logits.float(), dim=-1), tuple(present), alignment

    def project(self, x: Tensor) -> Tensor:
        """(N, T, D) → logits (N, T, V): the output projection (tied or not) plus the logits bias if any."""
        if self.output_proj is not None:
            logits = self.output_proj(x)
        else:
            logits = F.linear(x, self.tgt_embed.weight if self.tgt_embed is not None else self.embed.weight)
        return logits if self.logits_bias is None else logits + self.logits_bias

    def forward(self, src_ids: Tensor, src_pad_mask: Tensor, tgt_in: Tensor) -> Tensor:
        """Teacher-forced training pass: (B, S), (B, S), (B, T) → logits (B, T, V)."""
        memory = self.encode(src_ids, src_pad_mask)
        positions = torch.arange(tgt_in.shape[1], device=tgt_in.device)
        logits, _, _ = self._decode(tgt_in, positions, memory, src_pad_mask, None, log_probs=False)
        return logits


def reorder_cache(cache: DecoderCache, index: Tensor) -> DecoderCache:
    """Row i of the result continues row ``index[i]``: beam reordering, expansion and pruning in one gather."""
    return tuple((k.index_select(0, index), v.index_select(0, index)) for k, v in cache)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


MAX_GROUPS = 128  # top-k in two passes over at most this many groups of the vocabulary ...
MIN_GROUPS = MAX_CANDIDATES  # ... and at least this many (k must not exceed the group count)


def vocabulary_groups(vocab: int) -> int:
    """The group count of the two-pass top-k: the largest in [MIN_GROUPS, MAX_GROUPS] that divides ``vocab``
    (8000 → 125 groups of 64, 4000 → 125 of 32, 32000 → 128 of 250), so the table is grouped without a
    padded copy; MAX_GROUPS (and padding) when none does."""
    return next((g for g in range(MAX_GROUPS, MIN_GROUPS - 1, -1) if vocab % g == 0), MAX_GROUPS)


def best_candidates(log_probs: Tensor, k: int, eos_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """The step's output contract: log_probs (N, V) → the k best (scores (N, k), ids (N, k)) of each row, best
    first, and each row's EOS log prob (N,), which the search needs when it forces EOS at the max length.

    A row's k best entries lie in the k groups with the largest maxima (each of them is at most its group's
    maximum), so a top-k over the group maxima and one over those k groups' entries replace a top-k over
    the whole row: two reads of small arrays after one max-reduction, instead of a heap over V per row.
    The chosen set is exact; only equal values straddling the k-th place may be cut differently.
    """
    n, vocab = log_probs.shape
    if vocab < 4 * MAX_GROUPS:  # small vocabularies: one plain top-k is as cheap
        scores, ids = torch.topk(log_probs, k, dim=-1)  # (N, k) each
        return scores, ids, log_probs[:, eos_id]
    groups = vocabulary_groups(vocab)
    width = -(-vocab // groups)  # ceil: entries per group
    padded = log_probs
    if groups * width != vocab:  # no divisor in range: pad with -inf (a copy of the table)
        padded = F.pad(log_probs, (0, groups * width - vocab), value=float("-inf"))  # (N, G * W)
    grouped = padded.view(n, groups, width)  # (N, G, W)
    _, top_groups = torch.topk(grouped.amax(dim=-1), k, dim=-1)  # (N, k)
    members = top_groups[:, :, None] * width + torch.arange(width, device=log_probs.device)  # (N, k, W)
    members = members.reshape(n, k * width)  # (N, k * W) token ids
    scores, picked = torch.topk(padded.gather(1, members), k, dim=-1)  # (N, k) each
    return scores, members.gather(1, picked), log_probs[:, eos_id]
