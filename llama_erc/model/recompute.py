"""Block recompute: activation checkpointing that keeps each block's GEMM outputs, as one autograd node per block.

    forward (no graph):  run the block once; keep its input h and the outputs of wq, wk, wv, wo, w1, w3
    backward:            run the block again with a graph, each of those linears *replaying* its kept output
                         (a node whose backward is the linear's own: dx = g W) instead of recomputing x W^T;
                         norms, rotary, attention, SwiGLU and the LoRA branches (rank r: cheap) are recomputed;
                         then backprop the block's output gradient through that graph -> dh and the LoRA grads

So backward runs no forward GEMM of the frozen base twice ("full" runs all seven again), while only the tensors
above are kept between forward and backward ("none" keeps everything autograd saves). Unlike "selective"
(torch.utils.checkpoint with a per-op policy: a dispatch mode that intercepts every op of the block, in forward
and in the recompute), the block's ops run as they do without checkpointing, plus one Python call per linear
and one outer autograd node per block.

What is kept per linear, (N, out) in the activation dtype either way:
    plain nn.Linear, QuantLinear, merged LoRA   x W^T                replayed by _ReplayLinear / dequant_linear(out=)
    LoRALinear, eager twin (REFERENCE)         the base term x W^T   replayed, then the adapter term recomputed
    LoRALinear, fused op (kernels/lora_linear) the op's whole output (its epilogue adds the adapter term to the GEMM's
                                               accumulator, so x W^T alone never exists to be replayed exactly)
w2's output is not kept: it only feeds the residual add, whose backward needs no values, so the replay hands a
zero-stride placeholder of the right shape (the recomputed block output is never read, only differentiated).

Exactness: the recompute replays the dropout RNG (the state at the block's forward, restored, as
torch.utils.checkpoint does), and every node computes what it computed without checkpointing, so losses and
gradients are bit for bit those of "none" (tests/model/test_recompute.py).

Contract with in-place ops: a kept output must not be written in place afterwards (a q/k rotary applied in
place would corrupt the replayed value). `caches_gemm_outputs(mode)` says whether a mode keeps GEMM outputs
("selective" and "block" do). During the block's passes its modules run the op set's out-of-place variants
(`_out_of_place`: a field `<op>_` of Ops is swapped for `<op>`), and an in-place write that slips through anyway
(a hook, say) is refused by a version check after each pass instead of silently giving wrong gradients.

Memory per layer and token: engine/memory.py (the kept tensors above, e (2D + Q + 2K + 2F) bytes; 84,992 at
LLaMA-2-7B in bf16, against 109,736 for "none" with r=8 on wq, wv).
Not yet run: on a GPU (no device in the session that wrote it), under CUDA graph capture (engine/graphs.py; the
forward reads the CUDA RNG state, as torch.utils.checkpoint does) and inside torch.compile of a block (the
linears' forward is swapped for each pass, which a compiled block would see as a new module each call).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from llama_erc.kernels import REFERENCE, Ops, dequant_linear
from llama_erc.kernels import lora_linear as fused_lora_linear
from llama_erc.model.lora import LoRALinear
from llama_erc.model.quant import QuantLinear

_ATTENTION_LINEARS, _FFN_LINEARS = ("wq", "wk", "wv", "wo"), ("w1", "w2", "w3")
KEPT = ("wq", "wk", "wv", "wo", "w1", "w3")  # w2's output only feeds the residual add (module docstring)


def caches_gemm_outputs(mode: str) -> bool:
    """Whether activation checkpointing `mode` keeps GEMM outputs for backward (so they must not be written in
    place): "selective" (its policy keeps matmul outputs) and "block" do; "none" and "full" do not."""
    return mode in ("selective", "block")


class _ReplayLinear(torch.autograd.Function):
    """y = x W^T for a dense frozen W, with y given (recorded): forward returns it, backward is F.linear's input
    gradient as autograd computes it (one mm over the flattened rows), so the same bits."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, out: Tensor) -> Tensor:
        ctx.weight = weight  # the frozen parameter itself, not a copy
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor):
        w = ctx.weight  # (out, in)
        dx = g.reshape(-1, g.shape[-1]) @ w  # (N, in)
        return dx.view(*g.shape[:-1], w.shape[1]), None, None


def _linear(x: Tensor, weight, out: Tensor | None = None) -> Tensor:
    """x W^T through a frozen dense or quantized weight; with `out` given, its replay (no GEMM)."""
    if isinstance(weight, Tensor):
        return F.linear(x, weight) if out is None else _ReplayLinear.apply(x, weight, out)
    return dequant_linear(x, weight, out)


def _block_linears(block: nn.Module) -> dict[str, nn.Module]:
    found = {n: getattr(block.attention, n) for n in _ATTENTION_LINEARS}
    found.update({n: getattr(block.feed_forward, n) for n in _FFN_LINEARS})
    for name, m in found.items():
        if not isinstance(m, (nn.Linear, QuantLinear, LoRALinear)) or getattr(m, "bias", None) is not None:
            raise ValueError(f"block recompute: {name} is a {type(m).__name__}"
                             f"{' with a bias' if isinstance(m, nn.Linear) else ''}; it replays bias-free "
                             "nn.Linear, QuantLinear and LoRALinear")
    return found


class _Tape:
    """Stands in for the forward of a block's seven linears during one pass: recording (kept is filled) or
    replaying (kept is read)."""

    def __init__(self, kept: dict[str, Tensor] | None = None):
        self.replaying = kept is not None
        self.kept: dict[str, Tensor] = {} if kept is None else kept
        self.versions = {n: t._version for n, t in self.kept.items()}

    def check_untouched(self) -> None:
        """Refuse an in-place write into a kept output during the pass (autograd cannot see one made under
        no_grad in the recording forward, before the outputs are saved)."""
        for name, t in self.kept.items():
            if t._version != self.versions[name]:
                raise RuntimeError(f"block recompute: {name}'s output, kept for backward, was written in place "
                                   "during the block's forward; an in-place op must not run on it (recompute.py)")

    def __call__(self, name: str, module: nn.Module, x: Tensor) -> Tensor:
        out_dim = module.weight.shape[0]
        saved = None
        if self.replaying:
            # w2: a placeholder; its value is only added to the residual stream, and that sum is never read
            saved = self.kept[name] if name in KEPT else x.new_zeros(()).expand(*x.shape[:-1], out_dim)
        elif name in self.kept:
            raise RuntimeError(f"block recompute: {name} was called twice in one block forward")
        if isinstance(module, LoRALinear) and not module.merged:
            args = (x, module.weight, module.lora_a, module.lora_b, module.scale, module.dropout_p, module.training)
            op = module.ops.lora_linear
            if op is fused_lora_linear:
                y = op(*args, out=saved)
                kept = y
            elif op is REFERENCE.lora_linear:
                kept = _linear(x, module.weight, saved)
                y = op(*args, base=kept)
            else:
                raise ValueError(f"block recompute: unknown lora_linear op {op!r} (kernels.lora_linear or "
                                 "REFERENCE.lora_linear)")
        else:  # a frozen linear: plain, quantized, or a merged LoRA layer (now a plain weight)
            y = kept = _linear(x, module.weight, saved)
        if not self.replaying and name in KEPT:
            self.kept[name] = kept.detach()
            self.versions[name] = kept._version
        return y


@functools.cache
def _out_of_place(ops: Ops) -> Ops:
    """ops with each in-place variant (a field `<op>_` beside `<op>`, e.g. a rotary written into q and k, or a
    SwiGLU backward written over gate and up) replaced by its out-of-place op: those would write into the outputs
    this policy keeps. The same values either way, so only memory differs."""
    names = {f.name for f in dataclasses.fields(ops)}
    return dataclasses.replace(ops, **{n: getattr(ops, n[:-1]) for n in names if n.endswith("_") and n[:-1] in names})


@contextlib.contextmanager
def _taped(block: nn.Module, tape: _Tape):
    """Route the block's linears through `tape` for one pass (an instance attribute shadows the class's forward)
    and its modules to the out-of-place ops; both undone afterwards whatever happens."""
    linears = _block_linears(block)
    with_ops = [(m, m.ops) for m in block.modules() if isinstance(getattr(m, "ops", None), Ops)]
    try:
        for name, m in linears.items():
            m.forward = functools.partial(tape, name, m)
        for m, ops in with_ops:
            m.ops = _out_of_place(ops)
        yield
    finally:
        for m in linears.values():
            m.__dict__.pop("forward", None)
        for m, ops in with_ops:
            m.ops = ops


def _rng_devices(t: Tensor) -> list[int]:
    return [t.device.index if t.device.index is not None else torch.cuda.current_device()] if t.is_cuda else []


class BlockRecomputeFunction(torch.autograd.Function):
    """One transformer block as one node: inputs (block, h, cos, sin, mask, *trainable params) -> block(h).
    The trainable parameters are inputs so that their gradients leave this node like any other (DDP's hooks on
    their accumulators fire once, as without checkpointing)."""

    @staticmethod
    def forward(ctx, block: nn.Module, h: Tensor, cos: Tensor, sin: Tensor, mask, *params: Tensor) -> Tensor:
        ctx.block, ctx.devices = block, _rng_devices(h)
        # the RNG state the block's dropout draws from, restored for the recompute (so the same masks)
        ctx.cpu_rng = torch.get_rng_state()
        ctx.device_rng = [torch.cuda.get_rng_state(d) for d in ctx.devices]
        tape = _Tape()
        with _taped(block, tape):
            out = block(h, cos, sin, mask)
        tape.check_untouched()
        tensor_mask = mask if isinstance(mask, Tensor) else None
        ctx.block_mask = None if isinstance(mask, Tensor) else mask  # a BlockMask (or None): not a tensor
        ctx.save_for_backward(h, cos, sin, tensor_mask, *(tape.kept[n] for n in KEPT))
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor):
        h, cos, sin, tensor_mask, *kept = ctx.saved_tensors
        mask = tensor_mask if tensor_mask is not None else ctx.block_mask
        params = ctx.needs_input_grad[5:]
        with torch.random.fork_rng(devices=ctx.devices):
            torch.set_rng_state(ctx.cpu_rng)
            for d, state in zip(ctx.devices, ctx.device_rng):
                torch.cuda.set_rng_state(state, d)
            tape = _Tape(dict(zip(KEPT, kept)))
            with torch.enable_grad(), _taped(ctx.block, tape):
                h_in = h.detach().requires_grad_(ctx.needs_input_grad[1])
                out = ctx.block(h_in, cos, sin, mask)
            tape.check_untouched()
        trainable = [p for p in ctx.block.parameters() if p.requires_grad]
        if len(trainable) != len(params):
            raise RuntimeError("block recompute: the block's trainable parameters changed between forward and "
                               "backward")
        wanted = ([h_in] if h_in.requires_grad else []) + [p for p, need in zip(trainable, params) if need]
        grads = list(torch.autograd.grad(out, wanted, g, allow_unused=True))
        dh = grads.pop(0) if h_in.requires_grad else None
        dparams = [grads.pop(0) if need else None for need in params]
        return (None, dh, None, None, None, *dparams)


def block_recompute(block: nn.Module, h: Tensor, cos: Tensor, sin: Tensor, mask=None) -> Tensor:
    """block(h, cos, sin, mask) under the "block" policy (module docstring); the plain call when no graph is
    being built (no grad mode, or nothing in the block needs a gradient)."""
    params = [p for p in block.parameters() if p.requires_grad]
    if not torch.is_grad_enabled() or not (h.requires_grad or params):
        return block(h, cos, sin, mask)
    return BlockRecomputeFunction.apply(block, h, cos, sin, mask, *params)
