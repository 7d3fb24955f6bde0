"""The torch Transformer as a step function for ``model.search`` (training-time BLEU, parity tests)."""

from __future__ import annotations

import numpy as np
import torch

from model.search import StepOutput, is_identity, sentence_blocks
from model.signature import CAPACITY_STEP
from model.transformer import Transformer, best_candidates, reorder_cache


class TorchStepFunction:
    """Holds one batch's encoder output and decoder cache; each call decodes one token per row.

    The cache is right-padded as the exported step's (``Transformer.step``), so the ONNX parity tests compare
    the same computation. ``reorder`` (from the search) says which previous row each new row continues: the
    cache is gathered with it unless it is the identity, and the cross-attention K/V only when the rows'
    sentences change (expansion or pruning): one per sentence when its rows come in equal blocks, as the ONNX
    step function feeds them. Returns each row's ``k`` best candidates, as the ONNX step graph does.
    """

    def __init__(self, model: Transformer, src_ids: np.ndarray, src_pad_mask: np.ndarray) -> None:
        device = next(model.parameters()).device
        self.model = model
        self.device = device
        src = torch.from_numpy(np.asarray(src_ids, dtype=np.int64)).to(device)
        self.base_mask = torch.from_numpy(np.asarray(src_pad_mask, dtype=bool)).to(device)
        with torch.inference_mode():
            self.base_cross = model.cross_kv(model.encode(src, self.base_mask))
        self.row_sentence = np.arange(src.shape[0])
        self.cross = self.base_cross
        self.mask = self.base_mask
        self.cache = model.empty_cache(src.shape[0], device, capacity=CAPACITY_STEP)  # right-padded, as the ONNX step's

    def __call__(self, tokens: np.ndarray, step: int, reorder: np.ndarray | None, k: int) -> StepOutput:
        if reorder is not None and not is_identity(reorder, len(self.row_sentence)):
            index = torch.from_numpy(np.asarray(reorder, dtype=np.int64)).to(self.device)
            self.cache = reorder_cache(self.cache, index)
            row_sentence = self.row_sentence[reorder]
            if not np.array_equal(row_sentence, self.row_sentence):
                fed = sentence_blocks(row_sentence)  # one cross K/V per sentence for beams side by side
                sentence_index = torch.from_numpy(row_sentence if fed is None else fed).to(self.device)
                self.cross = reorder_cache(self.base_cross, sentence_index)
                self.mask = self.base_mask.index_select(0, sentence_index)
                self.row_sentence = row_sentence
        if step >= self.cache[0][0].shape[2]:  # no free slot for this step's K/V: grow, as the ONNX step function
            self.cache = tuple(
                tuple(torch.nn.functional.pad(t, (0, 0, 0, step + CAPACITY_STEP - t.shape[2])) for t in kv)
                for kv in self.cache
            )
        tok = torch.from_numpy(np.asarray(tokens, dtype=np.int64)).to(self.device)[:, None]  # (N, 1)
        positions = torch.full_like(tok, step)  # (N, 1): every row of a static batch is at the same step
        with torch.inference_mode():
            log_probs, self.cache, attn = self.model.step(tok, positions, self.cross, self.mask, self.cache)
            k = min(k, log_probs.shape[-1])
            scores, ids, eos = best_candidates(log_probs[:, 0].float(), k, self.model.config.eos_id)
        return StepOutput(scores.cpu().numpy(), ids.cpu().numpy(), eos.cpu().numpy(), attn[:, 0].float().cpu().numpy())
