"""Fused LoRA linear: one autograd node for  y = x W^T + s * (dropout(x) A^T) B^T,  s = alpha / r.

The spec is its eager twin, reference.lora_linear; this computes the same function with a hand-written
backward. With x2 = x flattened to (N, in), m the dropout keep-mask and c = 1 / (1 - p):
    forward:   x_d = x2 * m * c          xa = x_d A^T  (N, r)          y = x2 W^T + s * xa B^T  (N, out)
    backward:  dB  = s * g^T xa          dxa = s * g B  (N, r)          dA = dxa^T x_d
               dx  = g W + (dxa A) * m * c          [dW = g^T x2, only if W requires grad]
Why: the eager graph is eight autograd nodes (the base linear, dropout, two casts, two linears, the scale
and the add), and it saves x_d (N, in) in the activation dtype beside the dropout mask (on CPU, a noise
tensor in x's dtype), h (N, r) and copies of A and B cast to x's dtype. Here the scaled add runs in the
base GEMM's epilogue (addmm, beta=s), and backward keeps only x (alive anyway: the residual stream and
the sibling projections hold it), the bool mask (1 byte an element, versus x_d's 2 or 4), xa (N, r), and
W, A, B themselves (parameters: no cast copies). x_d is rebuilt in backward from x and the mask.
A frozen quantized base weight (model/quant.py) is dequantized in forward for the GEMM and again in backward
for dx, and never saved: the node holds the packed weight by reference (as kernels/dequant_linear.py does).
Cast points as in the eager path: A and B are cast to x's dtype for the matmuls, and their grads come back
in fp32 (their own dtype), as autograd through `.to()` gives them.
Dropout: torch.native_dropout is what F.dropout / nn.Dropout run on CUDA, and on CPU it draws the same
bernoulli mask and returns the same output, so one seed gives both paths one mask. Backward applies the
mask with native_dropout_backward (t * m / (1 - p)), i.e. what autograd of native_dropout does. In fp32
that rebuilds x_d bit for bit; in bf16 on CPU the forward multiplies by 1/(1-p) rounded to bf16 (as eager
F.dropout does there) and the backward by the unrounded factor: 0.2% apart at p=0.05, inside bf16 tolerance.
fp32 agrees with the eager path to GEMM rounding (tests: 1e-5); bf16 also differs in where the adapter
term is rounded (fused into the GEMM epilogues here).
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


def _apply_mask(t: Tensor, mask: Tensor, p: float) -> Tensor:
    """t * mask / (1 - p): native_dropout's own backward, so exactly what autograd of native_dropout would do."""
    return torch.ops.aten.native_dropout_backward(t, mask, 1.0 / (1.0 - p))


class LoRALinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float, p: float,
                out: Tensor | None = None) -> Tensor:
        in_dim = x.shape[-1]
        x2 = x.reshape(-1, in_dim)  # (N, in); a view when x is contiguous
        a = lora_a.to(x.dtype)  # (r, in)
        b = lora_b.to(x.dtype)  # (out, r)
        if p > 0:
            x_d, mask = torch.native_dropout(x2, p, True)  # (N, in) each; mask is bool
        else:
            x_d, mask = x2, None
        xa = x_d @ a.T  # (N, r)
        del x_d  # never saved: backward rebuilds it from x and the mask
        # y = s * (xa B^T) + x2 W^T: the rank-r product is the big GEMM's C matrix, added in its epilogue
        # (beta=s). Out of place, so that selective activation checkpointing may cache the GEMM outputs.
        quantized = not isinstance(weight, Tensor)  # a frozen quantized weight (model/quant.py)
        if out is None:
            w = weight.dequantize() if quantized else weight  # (out, in); dequantized: transient, never saved
            y = torch.addmm(torch.mm(xa, b.T), x2, w.T, beta=scale)  # (N, out)
            del w
        else:
            # block recompute (model/recompute.py): `out` is this op's output recorded in the block's first
            # forward. Only the mask (same RNG state, so the same draw) and xa, which backward saves, are redone;
            # the GEMM is skipped. The whole output is recorded, not x W^T alone, because the adapter term is
            # added in the GEMM's epilogue: x W^T is never rounded on its own, so it could not be replayed exactly.
            y = out.reshape(-1, out.shape[-1])  # (N, out), a view
        # A, B fp32: the parameters, no copies. A quantized weight is held by reference (its packed blocks are
        # the model's parameters) and dequantized again in backward.
        ctx.save_for_backward(x, mask, xa, None if quantized else weight, lora_a, lora_b)
        ctx.scale, ctx.p, ctx.qweight = scale, p, weight if quantized else None
        return y.view(*x.shape[:-1], y.shape[-1])  # (..., out)

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor):
        x, mask, xa, weight, lora_a, lora_b = ctx.saved_tensors
        need_x, need_w, need_a, need_b = ctx.needs_input_grad[:4]
        s, p = ctx.scale, ctx.p
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        g2 = g.reshape(-1, g.shape[-1])  # (N, out)
        dx = dw = da = db = None
        if need_b:
            db = (g2.T @ xa).mul_(s).to(lora_b.dtype)  # (out, r): scale the small result, not g
        if need_x or need_a:
            dxa = (g2 @ lora_b.to(g2.dtype)).mul_(s)  # (N, r)
            if need_a:
                x_d = x2 if mask is None else _apply_mask(x2, mask, p)  # (N, in), transient
                da = (dxa.T @ x_d).to(lora_a.dtype)  # (r, in)
                del x_d
            if need_x:
                a = lora_a.to(g2.dtype)  # (r, in)
                dx = g2 @ (weight if ctx.qweight is None else ctx.qweight.dequantize())  # (N, in)
                if mask is None:
                    dx.addmm_(dxa, a)  # dx += dxa A, in the GEMM epilogue
                else:
                    dx.add_(_apply_mask(dxa @ a, mask, p))  # dropout's backward: the same mask and 1/(1-p)
                dx = dx.view(x.shape)
        if need_w:  # never in LoRA training (W is frozen); computed rather than refused, for completeness
            dw = g2.T @ x2  # (out, in)
        return dx, dw, da, db, None, None, None


def lora_linear(x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float, dropout_p: float,
                training: bool, out: Tensor | None = None) -> Tensor:
    """x: (..., in) -> (..., out). weight (out, in) in x's dtype, or a frozen quantized weight (model/quant.py)
    whose compute dtype is x's; lora_a (r, in), lora_b (out, r), any float dtype.

    Dropout on the adapter input is applied only when training and dropout_p > 0, like nn.Dropout.
    out: (..., out), this op's output for the same inputs, recorded earlier (model/recompute.py's block
    recompute): returned through the same node (same backward) without recomputing the GEMM.
    """
    if weight.dtype != x.dtype:
        raise ValueError(f"lora_linear: weight dtype {weight.dtype} differs from x dtype {x.dtype}")
    if out is not None and out.shape != (*x.shape[:-1], weight.shape[0]):
        raise ValueError(f"lora_linear: out of shape {tuple(out.shape)} for x {tuple(x.shape)} and weight "
                         f"{tuple(weight.shape)}")
    return LoRALinearFunction.apply(x, weight, lora_a, lora_b, float(scale), dropout_p if training else 0.0, out)
