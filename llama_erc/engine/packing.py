"""Padding-free micro-batches: several examples per row, each attending only to itself (and a shared prefix).

ERC examples vary a lot in length (a short target with little context vs a long one), so right-padding a
micro-batch to its longest example spends much of its compute on pads. Packing places the micro-batch's
examples into rows of at most `max_len` tokens by first-fit decreasing (longest first, each into the first
row with room; ties broken by index, so the layout is a pure function of the examples) and pads only the
rows' tails. Per row:

    ids        e0 e0 e0 e0 | e1 e1 e1 | pad pad          (B, T)
    positions   0  1  2  3 |  0  1  2 |   0   0          rotary positions restart for each example
    segment     0  0  0  0 |  1  1  1 |  -1  -1          example index within the row, -1 on padding
    mask[t, s]  = s <= t and segment[s] == segment[t]     block-diagonal causal (pads see only themselves)

so every example computes exactly the hidden states it has alone in a padded row. The loss predicts
labels[t + 1] from position t; at a boundary that would predict e1's first token from e0's last, so each
example's first label is set to -100 (it never has a predecessor of its own, and `Sequence.n_supervised`
does not count it either). The summed loss over supervised tokens is therefore the same sum as unpacked; when
some example's `Sequence.weight` is not 1, `weights` (B, T) carries it on that example's supervised labels.

Shared prefix (`share_prefix=True`): DialogueLLM prompts all begin with the same instruction (49 of the ~108
tokens of a MELD prompt), and under causal attention a prefix's hidden states do not depend on what follows
it. So each row holds the micro-batch's common prefix once, followed by every example's remainder:

    ids        p  p  p | e0 e0 | e1 e1 e1 | pad          the prefix p is computed once per row, not per example
    positions   0  1  2 |  3  4 |  3  4  5 |   0          each remainder continues the prefix's positions
    segment    -2 -2 -2 |  0  0 |  1  1  1 |  -1          -2: seen by every example of the row
    mask[t, s]  = s <= t and (segment[s] == segment[t] or segment[s] == -2)

Each example again computes exactly its own hidden states, and the gradients that reach the prefix are the sum
of what each example's own copy would receive. The prefix stops before any supervised label's predecessor, so
no supervised token is lost (shared_prefix_length). One difference remains when LoRA dropout is on: the
prefix's dropout mask is drawn once per row rather than once per example (the same distribution per token,
shared by the row's examples).
With `flex=True` the batch carries the segments instead of the (B, T, T) mask, and the BlockMask is built from
them on the device (Batch.attention_mask, engine/batching.py).

Fixed shapes (`fixed_shape=True`, train.py's --cuda_graphs): every micro-batch becomes one of a few shapes, so
that a CUDA graph captured once per shape can replay it (engine/graphs.py). Rows are always max_len long, their
number is rounded up to a power of two (bucket_rows; the added rows are all padding, which attends only to
itself and reaches no loss), and the supervised gather's length to a power of two of at least MIN_SLOTS
(bucket_slots; the added slots have an ignored target and weight 0). Real tokens see exactly what they see
without the padding, so the loss is the same sum.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from llama_erc.data import IGNORE_INDEX, Sequence
from llama_erc.engine.batching import (PAD_SEGMENT, SHARED_SEGMENT, Batch, padded_batch, segment_mask,
                                      supervised_slots)


MIN_SLOTS = 16  # the smallest supervised-gather length of a fixed-shape batch (a few ERC label tokens)


def bucket_rows(n: int) -> int:
    """A fixed-shape batch's row count for n packed rows: the next power of two."""
    return 1 << max(n - 1, 0).bit_length()


def bucket_slots(n: int) -> int:
    """A fixed-shape batch's supervised-gather length for n supervised positions: a power of two >= MIN_SLOTS."""
    return max(MIN_SLOTS, 1 << max(n - 1, 0).bit_length())


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


def common_prefix(rows: list[list[int]] | list[tuple[int, ...]]) -> int:
    """Tokens all rows start with, leaving each at least one of its own."""
    n = min(len(r) for r in rows) - 1
    for r in rows[1:]:
        n = min(n, next((i for i in range(n) if r[i] != rows[0][i]), n))
    return max(n, 0)


def shared_prefix_length(seqs: list[Sequence]) -> int:
    """The sequences' common prefix, cut so that every supervised label's predecessor (label j is predicted from
    position j - 1) stays in the example's own segment."""
    n = common_prefix([s.ids for s in seqs])
    for s in seqs:
        supervised = [j for j, y in enumerate(s.labels) if j > 0 and y != IGNORE_INDEX]
        if supervised:
            n = min(n, supervised[0] - 1)
    return n


def pack(seqs: list[Sequence], pad_id: int, max_len: int, flex: bool = False, share_prefix: bool = False,
         fixed_shape: bool = False) -> Batch:
    """Pack `seqs` into rows of at most max_len tokens -> Batch with ids, labels, positions (B, T) and either
    mask (B, T, T) for SDPA or, with flex=True, segments (B, T) for a flex_attention BlockMask. share_prefix:
    each row starts with the sequences' common prefix once; fixed_shape: B = bucket_rows, T = max_len and the
    supervised gather bucket_slots long (module docstring)."""
    P = shared_prefix_length(seqs) if share_prefix else 0
    rows = first_fit_decreasing([len(s.ids) - P for s in seqs], max_len - P)
    if fixed_shape:
        B, T = bucket_rows(len(rows)), max_len
    else:
        B, T = len(rows), max(P + sum(len(seqs[i].ids) - P for i in row) for row in rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((B, T), dtype=torch.long)
    segments = torch.full((B, T), PAD_SEGMENT, dtype=torch.long)  # rows past len(rows) stay all padding
    weighted = any(s.weight != 1.0 for s in seqs)  # else weights=None: the loss's plain summed path
    weights = torch.zeros((B, T), dtype=torch.float32)  # each segment's weight, masked to labels below
    for r, row in enumerate(rows):
        ids[r, :P] = torch.tensor(seqs[row[0]].ids[:P], dtype=torch.long)  # the prefix: unsupervised
        positions[r, :P] = torch.arange(P)
        segments[r, :P] = SHARED_SEGMENT
        start = P
        for k, i in enumerate(row):
            s = seqs[i]
            end = start + len(s.ids) - P
            ids[r, start:end] = torch.tensor(s.ids[P:])
            # the segment's first label is never predicted from within it (see the docstring)
            labels[r, start + 1:end] = torch.tensor(s.labels[P + 1:], dtype=torch.long)
            positions[r, start:end] = torch.arange(P, len(s.ids))
            segments[r, start:end] = k
            weights[r, start:end] = s.weight
            start = end
    weights = torch.where(labels != IGNORE_INDEX, weights, 0.0) if weighted else None  # (B, T)
    n_tokens = P * len(rows) + sum(len(s.ids) - P for s in seqs)
    n_slots = bucket_slots(sum(s.n_supervised for s in seqs)) if fixed_shape else None
    index, targets, slot_weights = supervised_slots(labels, weights, n_slots)
    slots = dict(weights=weights, n_tokens=n_tokens, index=index, targets=targets, slot_weights=slot_weights)
    if flex:
        return Batch(ids, labels, positions, segments=segments, **slots)
    return Batch(ids, labels, positions, segment_mask(segments), **slots)


@dataclass(frozen=True)
class BatchLayout:
    """How a micro-batch's examples become model inputs: right-padded rows (`padded_batch`), or packed rows of
    at most max_len tokens (`pack`), with flex_attention BlockMasks (`flex`) and the shared prompt prefix once a
    row (`share_prefix`), each micro-batch in one of a few fixed shapes (`fixed_shapes`, for CUDA graphs).
    Every layout gives the same update."""
    packing: bool = False
    max_len: int = 512
    flex: bool = False
    share_prefix: bool = False
    fixed_shapes: bool = False

    def __post_init__(self) -> None:
        if (self.flex or self.share_prefix or self.fixed_shapes) and not self.packing:
            raise ValueError("flex attention, a shared prefix and fixed shapes apply to packed rows: add packing")
        if self.fixed_shapes and self.flex:
            # a BlockMask is built from the segments on the device every micro-batch, outside any static buffer
            raise ValueError("fixed shapes (CUDA graphs) take the bool SDPA mask, not flex attention's BlockMask")

    def batch(self, seqs: list[Sequence], pad_id: int) -> Batch:
        if self.packing:
            return pack(seqs, pad_id, self.max_len, flex=self.flex, share_prefix=self.share_prefix,
                        fixed_shape=self.fixed_shapes)
        return padded_batch(seqs, pad_id)
