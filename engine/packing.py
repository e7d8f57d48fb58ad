"""Padding-free micro-batches: several examples per row, each attending only to itself.

ERC examples vary a lot in length (a short target with little context vs a long one), so right-padding a
micro-batch to its longest example spends much of its compute on pads. Packing places the micro-batch's
examples into rows of at most `max_len` tokens by first-fit decreasing (longest first, each into the first
row with room; ties broken by index, so the layout is a pure function of the examples) and pads only the
rows' tails. Per row:

    ids        e0 e0 e0 e0 | e1 e1 e1 | pad pad          (B, T)
    positions   0  1  2  3 |  0  1  2 |   0   0          rotary positions restart for each example
    segment     0  0  0  0 |  1  1  1 |  -1  -1          example index within the row, -1 on padding
    mask[t, s]  = s <= t and segment[s] == segment[t]     block-diagonal causal (pads see only themselves)

so every example computes exactly the hidden states it has alone in a padded row. With `flex=True` the batch
carries the segments instead of the (B, T, T) mask, and the BlockMask is built from them on the device
(Batch.attention_mask, engine/batching.py). The loss predicts
labels[t + 1] from position t; at a boundary that would predict e1's first token from e0's last, so each
example's first label is set to -100 (it never has a predecessor of its own, and `Sequence.n_supervised`
does not count it either). The summed loss over supervised tokens is therefore the same sum as unpacked.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .batching import IGNORE_INDEX, Batch, Sequence, causal_mask


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of item indices with summed length <= capacity: longest first, each into the first bin with room."""
    too_long = [(i, n) for i, n in enumerate(lengths) if n > capacity]
    if too_long:
        raise ValueError(f"cannot pack: examples (index, length) {too_long[:5]} are longer than max_len {capacity}")
    bins: list[list[int]] = []
    room: list[int] = []  # free tokens left in each bin
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


def block_causal_mask(segments: Tensor) -> Tensor:
    """segments (B, T), -1 on padding -> bool (B, T, T): causal within each example; a pad sees only itself,
    so no softmax row is empty."""
    same = segments[:, :, None] == segments[:, None, :]  # (B, T, T)
    return causal_mask(same, segments != -1)


def pack(seqs: list[Sequence], pad_id: int, max_len: int, flex: bool = False) -> Batch:
    """Pack `seqs` into rows of at most max_len tokens -> Batch with ids, labels, positions (B, T) and either
    mask (B, T, T) for SDPA or, with flex=True, segments (B, T) for a flex_attention BlockMask."""
    rows = first_fit_decreasing([len(s.ids) for s in seqs], max_len)
    T = max(sum(len(seqs[i].ids) for i in row) for row in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), T), dtype=torch.long)
    segments = torch.full((len(rows), T), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for k, i in enumerate(row):
            s = seqs[i]
            end = start + len(s.ids)
            ids[r, start:end] = torch.tensor(s.ids)
            labels[r, start + 1:end] = torch.tensor(s.labels[1:], dtype=torch.long)  # first label: see docstring
            positions[r, start:end] = torch.arange(len(s.ids))
            segments[r, start:end] = k
            start = end
    if flex:
        return Batch(ids, labels, positions, segments=segments)
    return Batch(ids, labels, positions, block_causal_mask(segments))
