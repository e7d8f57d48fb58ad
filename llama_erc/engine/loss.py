"""Summed next-token cross-entropy over supervised positions only.

ERC supervises a handful of label tokens per example, so projecting every position onto the 32k vocabulary
(B x T x V fp32 logits) would be almost all waste: the final hidden states are gathered at the supervised
positions first, then projected, then cast to fp32 for the loss.

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
                mask: Tensor | BlockMask | None = None, weights: Tensor | None = None) -> Tensor:
        """input_ids, labels: (B, T) -> summed fp32 CE of predicting labels[:, t+1] from position t.

        positions (B, T) and mask (B, T, T) bool or a BlockMask are optional, as in Transformer.hidden_states.
        weights (B, T) fp32, aligned with labels: each supervised token's CE is multiplied by its weight.
        """
        h = self.model.hidden_states(input_ids, positions, mask)  # (B, T, D)
        targets = labels[:, 1:]  # (B, T-1): position t predicts token t+1
        supervised = targets != IGNORE_INDEX  # (B, T-1)
        h_sup = h[:, :-1][supervised]  # (N, D): only supervised positions reach the vocabulary projection
        logits = self.model.output(h_sup).float()  # (N, V) fp32 for a stable log-softmax
        if weights is None:
            return F.cross_entropy(logits, targets[supervised], reduction="sum")
        ce = F.cross_entropy(logits, targets[supervised], reduction="none")  # (N,)
        return (ce * weights[:, 1:][supervised]).sum()
