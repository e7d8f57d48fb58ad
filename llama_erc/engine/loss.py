"""Summed next-token cross-entropy over supervised positions only.

ERC supervises a handful of label tokens per example, so projecting every position onto the 32k vocabulary
(B x T x V fp32 logits) would be almost all waste: the final hidden states are gathered at the supervised
positions first, then projected, then cast to fp32 for the loss. The training step names those positions with
the batch's fixed-length index (engine/batching.py: supervised_slots, built on the host), so the gather is an
index_select of known length, with no device-to-host sync; the boolean gather over labels (B, T) is kept as its
twin, and the two give the same loss and gradients bit for bit (measured on CPU, fp32 and bf16:
tests/engine/test_supervised_gather.py).

Packed rows (engine/packing.py) pass per-row positions and a block-diagonal causal mask (a bool tensor, or a
flex_attention BlockMask) through to the model;
their labels are already -100 wherever a position would predict the next example's first token.

The loss is a SUM, sum_t w_t CE_t, with w_t the token's loss weight (`weights`; None means every w_t = 1, the
plain sum). The loop scales it by 1 / sum_t w_t over the whole global batch, so the step's loss is the weighted
mean sum_t w_t CE_t / sum_t w_t (with every weight 1, the mean over supervised tokens), and gradient
accumulation and data parallelism give the same update as one big batch.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask

from llama_erc.data import IGNORE_INDEX


class SupervisedLoss(nn.Module):
    """Wraps the Transformer so DistributedDataParallel sees one forward that returns the loss."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, labels: Tensor, positions: Tensor | None = None,
                mask: Tensor | BlockMask | None = None, weights: Tensor | None = None,
                index: Tensor | None = None) -> Tensor:
        """input_ids (B, T) -> summed fp32 CE of each supervised target, predicted from the position before it.

        Two ways to name the supervised positions:
        - index (N,) long, the fixed-length gather a Batch carries (engine/batching.py: supervised_slots): the
          flat (B*T) position predicting each slot; labels (N,) its target, -100 on padding slots; weights (N,)
          fp32 or None. No device-to-host sync: N is known before the forward. The training step's path.
        - index None: labels (B, T) aligned with input_ids, -100 where unsupervised, weights (B, T) or None; the
          boolean gather, whose data-dependent length costs a device sync on CUDA. The twin the gather is
          checked against (tests/engine/test_supervised_gather.py).
        positions (B, T) and mask (B, T, T) bool or a BlockMask are optional, as in Transformer.hidden_states.
        """
        h = self.model.hidden_states(input_ids, positions, mask)  # (B, T, D)
        if index is None:
            targets = labels[:, 1:]  # (B, T-1): position t predicts token t+1
            supervised = targets != IGNORE_INDEX  # (B, T-1)
            h_sup = h[:, :-1][supervised]  # (N, D): only supervised positions reach the vocabulary projection
            targets = targets[supervised]  # (N,)
            weights = None if weights is None else weights[:, 1:][supervised]  # (N,)
        else:
            h_sup = h.reshape(-1, h.shape[-1]).index_select(0, index)  # (B*T, D) -> (N, D)
            targets = labels  # (N,)
        logits = self.model.output(h_sup).float()  # (N, V) fp32 for a stable log-softmax
        # padding slots' target is IGNORE_INDEX: their CE (and its gradient) is exactly 0
        if weights is None:
            return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
        ce = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="none")  # (N,)
        return (ce * weights).sum()
