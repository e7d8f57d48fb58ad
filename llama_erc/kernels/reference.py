"""Pure-torch reference ops: the spec every Triton kernel in this package must match.

No triton import here, so the model can always fall back to these (CPU, debugging).

    rms_norm(x, w, eps)   y = (x32 * rsqrt(mean(x32^2) + eps)).to(x.dtype) * w        (Meta's cast points)
    add_rms_norm(x, r, w, eps)
                          h = x + r (one rounding, as torch's add), y = rms_norm(h, w, eps) -> (h, y)
    swiglu(gate, up)      y = silu(gate) * up                                         (in the input dtype)
    swiglu_(gate, up)     the same (the kernel's backward writes over gate and up; autograd's does not)
    apply_rope(x, c, s)   interleaved pairs (x[2i], x[2i+1]) rotated by angle theta_i:
                            y[2i]   = x[2i] * c_i - x[2i+1] * s_i
                            y[2i+1] = x[2i] * s_i + x[2i+1] * c_i
                          computed in fp32 from fp32 cos/sin, cast back to x.dtype  (Meta's complex multiply)
    rope_cos_sin(pos, head_dim, theta)  fp32 tables (..., head_dim/2) for positions of any leading shape.
    apply_rope_qk(q, k, c, s)   (apply_rope(q, c, s), apply_rope(k, c, s)): q and k rotated by one call
    apply_rope_qk_(q, k, c, s)  the same values copied back into q and k (the in-place op's semantics)
    lora_linear(x, W, A, B, s, p, training)
                          y = x W^T + s * (dropout_p(x) A^T) B^T, A and B cast to x.dtype     (LoRA, eager)
                          W may be a frozen quantized weight: x deq(W)^T through dequant_linear.py's node
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from llama_erc.kernels.dequant_linear import dequant_linear


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-5) -> Tensor:
    """x: (..., N), weight: (N,) -> (..., N) in the promoted dtype of x and weight."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return normed.to(x.dtype) * weight


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """x, residual: (..., N), weight: (N,) -> (h, y), both (..., N): the residual add and the RMSNorm after it.

        h = x + residual                  in promote_types(x, residual): the exact sum rounded once, as torch adds
        y = rms_norm(h, weight, eps)      exactly as above: h upcast to fp32, h32 * rsqrt(mean(h32^2) + eps)
                                          rounded to h.dtype, then times weight in promote_types(h, weight)

    The exact composition of the eager add and rms_norm, so a model that calls it computes bit for bit what it
    computed with the two ops. Gradients are autograd's: d(h) = dh + the norm's input gradient, and x and
    residual both receive d(h) (in their own dtype).
    """
    h = x + residual
    return h, rms_norm(h, weight, eps)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """gate, up: (..., F) -> silu(gate) * up, same shape and dtype."""
    return F.silu(gate) * up


def swiglu_(gate: Tensor, up: Tensor) -> Tensor:
    """swiglu, the twin of the op whose backward writes over gate and up: the same values and gradients
    (autograd's backward writes nothing in place). Refused, like the kernel, under an active dispatch mode."""
    if is_in_torch_dispatch_mode():
        raise RuntimeError("swiglu_: refused under an active torch dispatch mode (selective activation "
                           "checkpointing keeps gate and up); use swiglu")
    return swiglu(gate, up)


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float = 10000.0) -> tuple[Tensor, Tensor]:
    """positions: (T,) or (B, T) integer -> cos, sin: (T, Dh/2) or (B, T, Dh/2), both fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    angles = positions.float()[..., None] * inv_freq  # (..., Dh/2), fp32 like Meta's torch.outer
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (B, T, H, Dh); cos, sin: (T, Dh/2) or (B, T, Dh/2) fp32 -> (B, T, H, Dh) in x.dtype."""
    B, T, H, Dh = x.shape
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]  # (1, T, Dh/2)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # (B|1, T, 1, Dh/2): broadcast over heads
    pairs = x.float().reshape(B, T, H, Dh // 2, 2)  # (B, T, H, Dh/2, 2): (x[2i], x[2i+1])
    x0, x1 = pairs[..., 0], pairs[..., 1]
    y = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)  # (B, T, H, Dh/2, 2)
    return y.reshape(B, T, H, Dh).to(x.dtype)


def apply_rope_qk(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """q (B, T, H, Dh), k (B, T, Hkv, Dh); cos, sin as apply_rope -> (apply_rope(q), apply_rope(k)), fresh."""
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


def in_place_owner(x: Tensor) -> Tensor | None:
    """The tensor on which autograd can record an in-place rotation of x, or None where it cannot.

    x itself when x is no view; the tensor x views when x is all of it in the same order (a contiguous view of
    a contiguous tensor: wq(x).view(B, T, H, Dh)), so that its gradient is x's reshaped. None for other views: a
    part of a fused projection or a transpose, and views autograd forbids to write (made inside a custom
    Function, e.g. the fused LoRA linear's output; by a multi-output op such as chunk; under no_grad)."""
    base = x._base  # torch's record of the tensor x is a view of (None for a non-view)
    if base is None:
        return x
    if torch._C._autograd._get_creation_meta(x) != torch._C._autograd.CreationMeta.DEFAULT:
        return None  # autograd refuses an in-place write into such a view
    whole = base.numel() == x.numel() and base.data_ptr() == x.data_ptr()
    return base if whole and base.is_contiguous() and x.is_contiguous() else None


def apply_rope_qk_(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """apply_rope_qk's values copied back (copy_) into q and k where the kernel writes in place (no graph, or
    in_place_owner(x) is not None), else returned as fresh tensors, as the kernel does: the in-place op's
    values and autograd semantics (dirtied inputs, bumped versions), computed out of place first, so the twin
    allocates what the kernel saves. Refused, like the kernel, under an active dispatch mode."""
    if is_in_torch_dispatch_mode():
        raise RuntimeError("apply_rope_qk_: refused under an active torch dispatch mode (selective activation "
                           "checkpointing keeps the matmul outputs q and k are views of); use apply_rope_qk")
    q_rot, k_rot = apply_rope_qk(q, k, cos, sin)
    tracked = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    return tuple(x.copy_(rot) if not tracked or in_place_owner(x) is not None else rot
                 for x, rot in ((q, q_rot), (k, k_rot)))


def lora_linear(x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float, dropout_p: float,
                training: bool, base: Tensor | None = None) -> Tensor:
    """x: (..., in), weight (out, in) in x's dtype, lora_a (r, in), lora_b (out, r) any float dtype -> (..., out).

    A and B are cast to x's dtype for the matmuls (autograd returns their grads in their own dtype); dropout on
    the adapter's input only, when training and dropout_p > 0, as nn.Dropout would. A weight that is not a
    tensor is a frozen quantized one (model/quant.py): its base term is dequant_linear's, the same function.
    base: the base term x W^T already computed, in x's graph (model/recompute.py's block recompute replays a
    recorded GEMM output through a node with the same backward); computed here when None."""
    # first: autograd then sums x's gradient in the order the engine always has
    if base is not None:
        y = base
    else:
        y = F.linear(x, weight) if isinstance(weight, Tensor) else dequant_linear(x, weight)
    x_d = F.dropout(x, dropout_p, training) if dropout_p > 0 else x
    h = F.linear(x_d, lora_a.to(x.dtype))  # (..., r)
    return y + scale * F.linear(h, lora_b.to(x.dtype))
