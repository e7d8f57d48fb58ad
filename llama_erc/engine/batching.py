"""Which examples go into which micro-batch: a pure function of (seed, step, rank), so resume is exact.

The data position is implied by the optimizer step: step s is batch s % steps_per_epoch of epoch
s // steps_per_epoch, whose examples are a slice of that epoch's seeded permutation. Each global batch
(micro_batch * grad_accum * world_size examples) is cut into contiguous per-rank slices, each split into
grad_accum micro-batches. Every rank can therefore also count the supervised tokens of the whole global
batch without communicating, which is what the loss is normalised by: each token weighted by its example's
`Sequence.weight` (1, or alpha for an auxiliary task's examples), the loss being sum_t w_t CE_t / sum_t w_t.

A micro-batch reaches the model as a `Batch`: right-padded rows from `padded_batch`, or packed rows from
engine/packing.py (several examples per row, with per-row positions and a block-diagonal causal mask, given as a
bool tensor for SDPA or, built on the device from the rows' segment ids, as a flex_attention BlockMask).
Which examples form the micro-batch does not depend on the layout, so both give the same update.

Every Batch also names its supervised positions as a fixed-length gather (`supervised_slots`), built here on the
host where the labels already are: index (N,) into the flattened (B*T) hidden states, the target and the loss
weight of each slot. The loss then selects with index_select, whose output length is known before the forward;
the boolean gather `h[:, :-1][labels != -100]` it replaces has a data-dependent length, which on CUDA is a
device-to-host sync every micro-batch (and cannot be captured in a CUDA graph). N may exceed the supervised
count (a fixed-shape bucket, engine/graphs.py): the extra slots point at position 0, target -100 (ignored by the
cross-entropy: an exact 0) and weigh 0.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

from llama_erc.data import IGNORE_INDEX, Sequence  # IGNORE_INDEX: -100, the label cross-entropy skips

PAD_SEGMENT = -1  # segment id of padding in packed rows
SHARED_SEGMENT = -2  # segment id of a packed row's shared prompt prefix, which every example of the row sees
PROMPT = -1  # `owner` of an example's prompt tokens in label scoring (engine/decode.py); candidate k's are k



@dataclass(frozen=True)
class BatchPlan:
    n_examples: int
    micro_batch: int
    grad_accum: int
    world_size: int
    seed: int

    def __post_init__(self) -> None:
        if self.n_examples < self.global_batch:
            raise ValueError(f"the training set has {self.n_examples} examples, fewer than one global batch of "
                             f"{self.global_batch} (micro_batch {self.micro_batch} x grad_accum {self.grad_accum} "
                             f"x world_size {self.world_size})")

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return self.n_examples // self.global_batch  # the incomplete last batch of an epoch is dropped

    def global_indices(self, step: int) -> list[int]:
        epoch, b = divmod(step, self.steps_per_epoch)
        gen = torch.Generator().manual_seed(self.seed + epoch)
        perm = torch.randperm(self.n_examples, generator=gen)
        return perm[b * self.global_batch:(b + 1) * self.global_batch].tolist()

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """The grad_accum micro-batches (lists of example indices) of `rank` for optimizer step `step`."""
        idx = self.global_indices(step)
        per_rank = self.micro_batch * self.grad_accum
        mine = idx[rank * per_rank:(rank + 1) * per_rank]
        return [mine[i:i + self.micro_batch] for i in range(0, per_rank, self.micro_batch)]


@dataclass(frozen=True)
class Batch:
    """Model inputs of one micro-batch. positions/mask/segments are None for right-padded rows (plain causal
    attention). Packed rows carry either `mask` (SDPA) or `segments` (flex_attention), see attention_mask()."""
    ids: Tensor  # (B, T) token ids
    labels: Tensor  # (B, T) aligned with ids; -100 where nothing is supervised
    positions: Tensor | None = None  # (B, T) rotary positions, restarting at 0 for each packed example
    mask: Tensor | None = None  # (B, T, T) bool, True where query t may attend to key s
    segments: Tensor | None = None  # (B, T) example index within its row; PAD_SEGMENT, SHARED_SEGMENT
    weights: Tensor | None = None  # (B, T) fp32 loss weight aligned with labels, 0 where unsupervised; None: all 1
    n_tokens: int = 0  # real (non-pad) positions the model computes: a shared prefix counts once per row
    index: Tensor | None = None  # (N,) long: flat (B*T) position predicting each supervised slot's target
    targets: Tensor | None = None  # (N,) long: each slot's target token; -100 on padding slots
    slot_weights: Tensor | None = None  # (N,) fp32 loss weight per slot, 0 on padding slots; None: all 1

    def to(self, device: torch.device) -> "Batch":
        def move(t):
            return None if t is None else t.to(device, non_blocking=True)
        return replace(self, ids=move(self.ids), labels=move(self.labels), positions=move(self.positions),
                       mask=move(self.mask), segments=move(self.segments), weights=move(self.weights),
                       index=move(self.index), targets=move(self.targets), slot_weights=move(self.slot_weights))

    def loss_inputs(self) -> tuple:
        """engine.loss.SupervisedLoss's arguments for this batch, through the sync-free fixed-length gather."""
        if self.index is None:
            raise ValueError("this Batch has no supervised slots: build it with padded_batch or pack")
        return self.ids, self.targets, self.positions, self.attention_mask(), self.slot_weights, self.index

    def attention_mask(self) -> Tensor | BlockMask | None:
        """What the model takes as `mask`: the bool mask, or a BlockMask built where `segments` lives."""
        return self.mask if self.segments is None else flex_block_mask(self.segments)


def supervised_slots(labels: Tensor, weights: Tensor | None, n_slots: int | None = None
                     ) -> tuple[Tensor, Tensor, Tensor | None]:
    """Host labels (B, T) (and weights (B, T) or None) -> the loss's fixed-length gather: index (N,) long into the
    flattened (B*T) positions, targets (N,) long and weights (N,) fp32 (None when `weights` is None).

    Slot k is the k-th supervised position in row-major order, the order of the boolean gather, so the loss sums
    the same terms in the same order. n_slots (default: the supervised count) pads with slots that point at
    position 0, target IGNORE_INDEX and weight 0.
    """
    B, T = labels.shape
    supervised = labels[:, 1:] != IGNORE_INDEX  # (B, T-1): position t predicts label t+1
    rows, cols = supervised.nonzero(as_tuple=True)  # on the host: no device sync
    n = rows.numel()
    n_slots = n if n_slots is None else n_slots
    if n > n_slots:
        raise ValueError(f"{n} supervised positions do not fit n_slots={n_slots}")
    index = torch.zeros(n_slots, dtype=torch.long)
    index[:n] = rows * T + cols  # flat into (B*T)
    targets = torch.full((n_slots,), IGNORE_INDEX, dtype=torch.long)
    targets[:n] = labels[rows, cols + 1]
    if weights is None:
        return index, targets, None
    slot_weights = torch.zeros(n_slots, dtype=torch.float32)
    slot_weights[:n] = weights[rows, cols + 1]
    return index, targets, slot_weights


def causal_mask(visible: Tensor, real: Tensor) -> Tensor:
    """The one attention-mask builder: query t sees key s when s <= t, visible[b, t, s] and both are real tokens.

    visible: (B, T, T) bool, which keys each query may see apart from causality; real: (B, T) bool, False on
    padding. Every position also sees itself, so no softmax row is empty (padding sees only itself).
    """
    T = real.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=real.device).tril()  # (T, T)
    eye = torch.eye(T, dtype=torch.bool, device=real.device)
    return (causal & visible & real[:, :, None] & real[:, None, :]) | eye  # (B, T, T)


def segment_mask(segments: Tensor, owner: Tensor | None = None) -> Tensor:
    """segments (B, T) -> bool (B, T, T), the packed rows' attention rule: query t sees key s when s <= t and s is
    in t's own example or in the row's shared prefix; a pad sees only itself, so no softmax row is empty.

    owner (B, T), for label scoring: PROMPT on an example's prompt, k on its candidate k. Within an example a
    query then sees the prompt and its own candidate only, never another candidate.
    """
    same = segments[:, :, None] == segments[:, None, :]  # (B, T, T)
    if owner is not None:
        same &= (owner[:, None, :] == PROMPT) | (owner[:, None, :] == owner[:, :, None])
    return causal_mask(same | (segments[:, None, :] == SHARED_SEGMENT), segments != PAD_SEGMENT)


def flex_block_mask(segments: Tensor) -> BlockMask:
    """segments (B, T) -> the BlockMask twin of segment_mask, the same rule evaluated per (query, key) index.
    Tiles no query of which sees any key of are skipped by flex_attention: the cross-example tiles of a packed
    row cost nothing."""
    B, T = segments.shape

    def visible(b, h, q, kv):  # flex_attention's mask_mod, evaluated on index tensors
        seg_q, seg_kv = segments[b, q], segments[b, kv]
        real = (seg_q != PAD_SEGMENT) & (seg_kv != PAD_SEGMENT)
        return ((kv <= q) & real & ((seg_q == seg_kv) | (seg_kv == SHARED_SEGMENT))) | (q == kv)
    return create_block_mask(visible, B, None, T, T, device=segments.device)


def padded_batch(seqs: list[Sequence], pad_id: int) -> Batch:
    """The one right-padding layout: rows padded to the longest sequence -> ids (B, T) padded with pad_id and
    labels (B, T) with -100 on pads, plus per-token `weights` only when some example's weight is not 1 (then
    None keeps the loss on its plain summed path, engine/loss.py).

    Right padding keeps every real token's causal context free of pads, so no attention mask is needed.
    """
    if not seqs:
        raise ValueError("padded_batch: empty batch")
    for i, s in enumerate(seqs):
        if len(s.ids) != len(s.labels) or not s.ids:
            raise ValueError(f"padded_batch: row {i} has {len(s.ids)} ids and {len(s.labels)} labels")
    T = max(len(s.ids) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(seqs), T), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    for i, s in enumerate(seqs):
        ids[i, :len(s.ids)] = torch.tensor(s.ids, dtype=torch.long)
        labels[i, :len(s.labels)] = torch.tensor(s.labels, dtype=torch.long)
    n_tokens = sum(len(s.ids) for s in seqs)
    weights = None
    if any(s.weight != 1.0 for s in seqs):
        w = torch.tensor([s.weight for s in seqs], dtype=torch.float32)  # (B,)
        weights = torch.where(labels != IGNORE_INDEX, w[:, None], 0.0)  # (B, T)
    index, targets, slot_weights = supervised_slots(labels, weights)
    return Batch(ids, labels, weights=weights, n_tokens=n_tokens, index=index, targets=targets,
                 slot_weights=slot_weights)
