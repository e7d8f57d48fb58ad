"""One optimizer step: the code the training loop runs and bench.py times.

    micro-batches (lists of Sequences) -> BatchLayout.batch -> device -> summed loss, scaled by
    world_size / sum_t w_t -> backward (DDP syncs gradients on the last micro-batch only) -> all-reduce of the
    loss (and the loop's stop flag) -> clip at grad_clip -> finite check -> AdamW step -> zero grads

With --cuda_graphs the loss and backward of each micro-batch are one CUDA graph's replay (engine/graphs.py).

The loss of a micro-batch is a SUM, sum_t w_t CE_t (engine/loss.py); dividing by sum_t w_t over the whole
global batch (`weight_sum`, the same on every rank) makes the step's loss the weighted mean, and DDP's
average over ranks is undone by the world_size factor, so accumulation and data parallelism give the update of
one big batch. A non-finite loss or gradient norm raises before the optimizer touches the adapters.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from llama_erc.data import Sequence
from llama_erc.engine.graphs import StepGraphs
from llama_erc.engine.packing import BatchLayout


class NonFiniteError(RuntimeError):
    """The loss or gradient norm is NaN/inf; the optimizer did not step."""


@dataclass(frozen=True)
class StepResult:
    loss: float  # the weighted mean loss over the global batch (all ranks)
    grad_norm: float  # before clipping
    computed_tokens: int  # positions this rank's model computed (pads aside; a shared prefix once a row)
    stop: bool  # some rank asked to stop (train_step's `stop`, asked after the backward passes)


def train_step(loss_fn: nn.Module, opt: torch.optim.Optimizer, params: list[nn.Parameter],
               micro_batches: list[list[Sequence]], *, layout: BatchLayout, pad_id: int, weight_sum: float,
               grad_clip: float, device: torch.device, world_size: int = 1,
               stop: Callable[[], bool] | None = None, graphs: StepGraphs | None = None) -> StepResult:
    """One update of `params` from this rank's micro-batches (module docstring). loss_fn is an
    engine.loss.SupervisedLoss, DistributedDataParallel-wrapped when world_size > 1. `stop` says whether this
    rank was asked to stop (a signal); with several ranks the answer is all-reduced with the loss, so every rank
    finishes the same step. graphs: loss_fn's forward + backward captured per batch shape (engine/graphs.py;
    fixed-shape layouts, one process), replayed in place of the eager calls."""
    loss_sum = torch.zeros((), device=device)
    computed = 0
    for j, seqs in enumerate(micro_batches):
        batch = layout.batch(seqs, pad_id).to(device)  # ids, labels, weights (b, T); packed: positions, mask
        computed += batch.n_tokens
        if graphs is not None:  # copy into the batch shape's buffers, replay its forward + backward
            loss_sum += graphs(batch, world_size / weight_sum)
        else:
            last = j == len(micro_batches) - 1
            with nullcontext() if (last or world_size == 1) else loss_fn.no_sync():
                loss = loss_fn(*batch.loss_inputs())  # the fixed-length supervised gather: no device sync
                (loss * (world_size / weight_sum)).backward()
            loss_sum += loss.detach()
    stopping = stop is not None and stop()
    if world_size > 1:  # the stop decision travels with the loss: any rank's signal stops every rank
        both = torch.stack([loss_sum, torch.tensor(float(stopping), device=device)])
        dist.all_reduce(both)
        loss_sum, stopping = both[0], bool(both[1].item() > 0)
    gnorm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip))
    loss_val = loss_sum.item() / weight_sum
    if not (math.isfinite(loss_val) and math.isfinite(gnorm)):
        raise NonFiniteError(f"non-finite {'loss' if not math.isfinite(loss_val) else 'gradient norm'} (loss "
                             f"{loss_val}, grad norm {gnorm})")
    opt.step()
    opt.zero_grad(set_to_none=graphs is None)  # captured backwards add into the same .grad tensors every step
    return StepResult(loss_val, gnorm, computed, stopping)
