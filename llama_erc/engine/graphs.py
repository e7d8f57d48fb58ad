"""CUDA graphs for the training step (train.py --cuda_graphs): one captured forward + backward per batch shape;
and for label-restricted scoring (ScoreGraphs, eval.py --cuda_graphs and the dev evaluations of such a run): one
captured forward per shape of engine/decode.py's fixed-shape score batches.

Why: an ERC micro-batch is small (8 examples of ~100 tokens), so on a large GPU the step is bound by kernel
launches (about 3,000 a step, issue 19), not by the matmuls. A CUDA graph replays a captured sequence of kernels
with one launch. Replay needs fixed shapes and fixed addresses, so with --cuda_graphs every micro-batch is packed
into one of a few shapes (engine/packing.py: fixed_shape; rows x max_len and a supervised gather of a bucketed
length, engine/batching.py: supervised_slots) and each shape is captured once, the first time it occurs.

How (PyTorch's whole-network capture recipe, docs: "CUDA Graphs" in the CUDA semantics notes):
- static inputs: a buffer per loss input of the shape (ids, targets, positions, mask, slot weights, index) and
  one 0-d loss scale, world_size / weight_sum, which changes every step. Each micro-batch is copied into its
  shape's buffers, then the graph is replayed.
- gradients accumulate across micro-batches and shapes: the adapters' .grad tensors exist (zeros) before any
  capture, so every captured backward adds into them in place, as eager accumulation does. The step must then
  zero them in place (zero_grad(set_to_none=False)): every graph writes to those addresses.
- warm-up: a few eager iterations on a side stream before capture (lazy initialisation, Triton compilation,
  library workspaces). Capture may happen mid-step, when a new shape first appears, so the gradients are saved
  before the warm-up and restored after it: the step's accumulation is left as it was.
- all graphs share one memory pool: they never run concurrently, nothing an earlier replay wrote is read after a
  later one (the loss is copied out right after its replay), and parameters and gradients live outside the pool.
- the optimizer step (clip, finite check, AdamW, fused on CUDA) runs eagerly after the replays: the lr changes
  every step, which a captured step would freeze, and fused AdamW is already a few launches. The finite check
  reads the loss and the gradient norm back at the end of the optimizer step: the host waits on the device there
  only, once per optimizer step (not per micro-batch).
Refused: several processes (DDP's all-reduce hooks run inside backward), a CPU device (train.py runs the same
fixed-shape batches eagerly there). With LoRA dropout the masks come from the graph-safe generator and differ
from the eager step's, as another seed would.
Nothing in this module has run on a GPU yet (it was written in a session without one). Open in particular:
whether activation checkpointing captures: torch.utils.checkpoint stashes the CUDA RNG state in every
checkpointed forward, and reading that state is what a capture may refuse (a failed capture raises with the
input shapes named). tests/engine/test_graphs.py's gpu-marked test covers --activation_checkpointing none and
full.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from llama_erc.engine.batching import Batch
from llama_erc.engine.decode import score_batch

WARMUP_ITERS = 3  # eager iterations before a capture, as in PyTorch's recipe


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: tuple  # static buffers, one per loss input (None where the batch has none)
    out: Tensor  # the replay's output: StepGraphs' summed loss (0-d), ScoreGraphs' token log-probs (N,)


class _ShapeGraphs:
    """What both kinds share: a graph per input shape, captured (by the subclass's _capture) the first time the
    shape occurs; each call copies its inputs into that shape's static buffers and replays the graph."""
    graphs: dict[tuple, _Captured]

    def _capture(self, inputs: tuple) -> _Captured:
        raise NotImplementedError

    def _replay(self, inputs: tuple) -> Tensor:
        key = tuple(None if t is None else (tuple(t.shape), t.dtype) for t in inputs)
        captured = self.graphs.get(key)
        if captured is None:
            captured = self.graphs[key] = self._capture(inputs)
        for static, t in zip(captured.inputs, inputs):
            if static is not None:
                static.copy_(t, non_blocking=True)
        captured.graph.replay()
        return captured.out.clone()  # out of the shared pool before another graph may reuse its memory


class StepGraphs(_ShapeGraphs):
    """Forward + backward of SupervisedLoss, captured once per input shape and replayed:
    `loss = graphs(batch, scale)` does what `loss = loss_fn(*batch.loss_inputs()); (loss * scale).backward()`
    does, returning the summed loss detached."""

    def __init__(self, loss_fn: nn.Module, params: list[nn.Parameter], warmup_iters: int = WARMUP_ITERS):
        if isinstance(loss_fn, nn.parallel.DistributedDataParallel):
            raise ValueError("CUDA graphs capture one process's step: DistributedDataParallel's gradient hooks "
                             "are not captured; run with one process")
        devices = {p.device for p in params}
        if len(devices) != 1 or next(iter(devices)).type != "cuda":
            raise ValueError("CUDA graphs need the trainable parameters on one CUDA device, got "
                             f"{sorted(map(str, devices))}")
        self.loss_fn, self.params, self.warmup_iters = loss_fn, params, warmup_iters
        self.device = next(iter(devices))
        self.scale = torch.zeros((), device=self.device)  # static: world_size / weight_sum of the current step
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple, _Captured] = {}

    def __call__(self, batch: Batch, scale: float) -> Tensor:
        self.scale.fill_(scale)  # a kernel argument, not a host read: no sync
        return self._replay(batch.loss_inputs())

    def _forward_backward(self, inputs: tuple) -> Tensor:
        loss = self.loss_fn(*inputs)
        (loss * self.scale).backward()
        return loss.detach()

    def _capture(self, inputs: tuple) -> _Captured:
        for p in self.params:  # accumulate in place from the first capture on (module docstring)
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        saved = [p.grad.clone() for p in self.params]
        static = tuple(None if t is None else t.clone() for t in inputs)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup_iters):
                self._forward_backward(static)
        torch.cuda.current_stream(self.device).wait_stream(side)
        with torch.no_grad():  # the warm-up's gradients were not this step's
            for p, g in zip(self.params, saved):
                p.grad.copy_(g)
        graph = torch.cuda.CUDAGraph()
        shapes = [None if t is None else tuple(t.shape) for t in inputs]
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                loss = self._forward_backward(static)
        except RuntimeError as e:
            raise RuntimeError(f"capturing the training step for input shapes {shapes} failed ({e}); train "
                               "without --cuda_graphs") from e
        return _Captured(graph, static, loss)


class ScoreGraphs(_ShapeGraphs):
    """Label scoring's forward (engine/decode.py score_batch: cached prefix, rows, vocabulary projection of the
    target positions), captured once per fixed shape and replayed: `graphs(batch.inputs)` returns what
    `score_batch(model, *batch.inputs)` returns, as a fresh tensor. Evaluation is launch-bound like the ERC step
    (short rows, ~30 layers of small kernels), and it has no optimizer step, so the whole forward is one replay.

    The same recipe as StepGraphs: static input buffers per shape, a warm-up on a side stream, one memory pool,
    the output cloned out of the pool. No gradients, so nothing to save or restore around a capture. The model
    must stay in eval mode and its weights must not be replaced while the graphs live (they read the weights'
    addresses); build a new ScoreGraphs per evaluation.
    """

    def __init__(self, model: nn.Module, warmup_iters: int = WARMUP_ITERS):
        device = next(model.parameters()).device
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device, got {device}")
        self.model, self.device, self.warmup_iters = model, device, warmup_iters
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple, _Captured] = {}

    @torch.no_grad()
    def __call__(self, inputs: tuple) -> Tensor:
        return self._replay(inputs)

    def _capture(self, inputs: tuple) -> _Captured:
        static = tuple(None if t is None else t.to(self.device).clone() for t in inputs)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup_iters):
                score_batch(self.model, *static)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        shapes = [None if t is None else tuple(t.shape) for t in inputs]
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                out = score_batch(self.model, *static)
        except RuntimeError as e:
            raise RuntimeError(f"capturing label scoring for input shapes {shapes} failed ({e}); evaluate "
                               "without --cuda_graphs") from e
        return _Captured(graph, static, out)
