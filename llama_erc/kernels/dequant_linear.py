"""y = x deq(W)^T through a frozen quantized weight, as one autograd node that saves no weight.

    forward:   W = deq(Wq)  (out, in), transient       y = x W^T
    backward:  W = deq(Wq)  again, transient           dx = g W        (no dW: the packed weight is frozen)

`qweight` is any frozen quantized weight: an object with `.dequantize() -> Tensor (out, in)` in its `.dtype`
(model/quant.py's QuantizedWeight, which dequantizes through its op set: a Triton kernel or its twin). The
node keeps a reference to that object, whose packed blocks are parameters held by the model anyway, and saves
nothing with save_for_backward: so no weight-sized tensor outlives the forward, under activation
checkpointing or without it (tests/model/test_quant.py audits the saved tensors). The price is one more
dequantization per weight in backward, a pass over the packed bytes.

Exactness: forward is F.linear(x, W) and backward the same mm as autograd's for F.linear (grad_x = g W over
the flattened rows), so with W bit-identical to a dequantized-at-load weight, losses and gradients are
bit-identical to that path's (tests: fp32, step by step).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable


class DequantLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, qweight, out: Tensor | None = None) -> Tensor:
        ctx.qweight = qweight  # a reference to the frozen packed weight, not a saved tensor
        if out is not None:  # recorded earlier (model/recompute.py): no dequantization, no GEMM
            return out
        return F.linear(x, qweight.dequantize())  # (..., out); the dequantized weight dies here

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        out_dim = g.shape[-1]
        w = ctx.qweight.dequantize()  # (out, in), transient
        dx = g.reshape(-1, out_dim) @ w  # (N, in): autograd's mm for F.linear's input gradient
        return dx.view(*g.shape[:-1], w.shape[1]), None, None


def dequant_linear(x: Tensor, qweight, out: Tensor | None = None) -> Tensor:
    """x: (..., in) -> (..., out) = x deq(qweight)^T; x must be in the weight's compute dtype.

    out: (..., out), x deq(qweight)^T recorded earlier (model/recompute.py's block recompute): returned through the
    same node, so backward is unchanged, while the forward's dequantization and GEMM are skipped."""
    if x.dtype != qweight.dtype:
        raise ValueError(f"dequant_linear: x dtype {x.dtype} differs from the weight's compute dtype {qweight.dtype}")
    if out is not None and out.shape != (*x.shape[:-1], qweight.shape[0]):
        raise ValueError(f"dequant_linear: out of shape {tuple(out.shape)} for x {tuple(x.shape)} and weight "
                         f"{tuple(qweight.shape)}")
    if torch.is_grad_enabled() and x.requires_grad:
        return DequantLinearFunction.apply(x, qweight, out)
    return F.linear(x, qweight.dequantize()) if out is None else out  # no graph to build: the plain function
