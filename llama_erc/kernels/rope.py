"""Rotary position embedding with Meta's interleaved pairs (x[2i], x[2i+1]) and fp32 cos/sin tables.

For each (b, t, h) and pair i < Dh/2, with c = cos[(b,) t, i], s = sin[(b,) t, i]:
    y[2i]   = x[2i] * c - x[2i+1] * s
    y[2i+1] = x[2i] * s + x[2i+1] * c
which is reference.apply_rope (Meta's complex multiply by exp(i theta)). Cast points: x is upcast to fp32,
rotated with the fp32 tables, rounded once (to nearest even, cast_rne) to x.dtype on store, as in the reference.
Backward is the transpose of the rotation, the rotation by -theta (s -> -s): the same kernel with BACKWARD=True.
cos/sin are (T, Dh/2) for shared positions or (B, T, Dh/2) (or (1, T, Dh/2)) for per-row positions (packed
sequences); they are differentiated by nobody, so apply_rope refuses tables that require grad.
Layout: x is read through its 4 strides, so q/k as views of a linear output reshaped to (B, T, H, Dh), or with
T and H swapped, need no copy; y is written contiguous (B, T, H, Dh). A program owns a (BLOCK_T, BLOCK_H, Dh)
tile of one batch row and loads each cos/sin row once for all BLOCK_H heads, so q (32 heads) and k (any
n_kv_heads) use the same kernel.
Traffic (e = element size): reads x (B T H Dh e) and cos, sin (2 x B|1 x T x Dh/2 x 4); writes y (B T H Dh e).
Refs: Su et al. 2021, "RoFormer" (rotary embeddings); meta-llama/llama llama/model.py, apply_rotary_emb.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

from llama_erc.kernels._utils import (TILE_ELEMS, cast_rne, check_float, check_same_device, num_warps_for,
                                       row_launch_config)


@triton.jit
def _rope_kernel(
    x_ptr, cos_ptr, sin_ptr, y_ptr,  # (B, T, H, Dh) strided, (B|1, T, P) fp32 x2, (B, T, H, Dh) contiguous
    T, H, P,  # P = Dh / 2 pairs
    stride_xb, stride_xt, stride_xh, stride_xd,
    stride_cb, stride_ct, stride_cp,  # stride_cb = 0 for (T, P) tables shared by the batch
    stride_sb, stride_st, stride_sp,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_P: tl.constexpr,  # next_power_of_2(P); the tile holds 2 * BLOCK_P elements per head
    BACKWARD: tl.constexpr,  # rotate by -theta: the gradient of the forward rotation
):
    ts = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # int64: B*T*H*Dh may pass 2**31
    b = tl.program_id(1).to(tl.int64)
    hs = tl.program_id(2).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    ds = tl.arange(0, 2 * BLOCK_P).to(tl.int64)
    ps = tl.arange(0, BLOCK_P).to(tl.int64)
    mask = (ts < T)[:, None, None] & (hs < H)[None, :, None] & (ds < 2 * P)[None, None, :]
    x = tl.load(x_ptr + b * stride_xb + ts[:, None, None] * stride_xt + hs[None, :, None] * stride_xh
                + ds[None, None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)  # (BT, BH, 2 BP)
    x0, x1 = tl.split(tl.reshape(x, (BLOCK_T, BLOCK_H, BLOCK_P, 2)))  # (BT, BH, BP) each: x[2i], x[2i+1]
    tmask = (ts < T)[:, None] & (ps < P)[None, :]
    c = tl.load(cos_ptr + b * stride_cb + ts[:, None] * stride_ct + ps[None, :] * stride_cp, mask=tmask, other=0.0)
    s = tl.load(sin_ptr + b * stride_sb + ts[:, None] * stride_st + ps[None, :] * stride_sp, mask=tmask, other=0.0)
    c, s = c.to(tl.float32)[:, None, :], s.to(tl.float32)[:, None, :]  # (BT, 1, BP): shared by the heads
    if BACKWARD:
        s = -s
    y = tl.join(x0 * c - x1 * s, x0 * s + x1 * c)  # (BT, BH, BP, 2): pairs interleaved again
    y = tl.reshape(y, (BLOCK_T, BLOCK_H, 2 * BLOCK_P))
    offs = ((b * T + ts[:, None, None]) * H + hs[None, :, None]) * (2 * P) + ds[None, None, :]
    tl.store(y_ptr + offs, cast_rne(y, y_ptr.dtype.element_ty), mask=mask)


def _check(name: str, x: Tensor, cos: Tensor, sin: Tensor) -> None:
    check_float(name, x)
    for n, t in (("cos", cos), ("sin", sin)):
        if not isinstance(t, Tensor) or t.dtype != torch.float32:
            raise ValueError(f"apply_rope: {n} must be an fp32 tensor (the model's tables), got "
                             f"{getattr(t, 'dtype', type(t).__name__)}")
    if x.dim() != 4 or x.shape[-1] % 2:
        raise ValueError(f"apply_rope: {name} {tuple(x.shape)} must be (B, T, H, Dh) with Dh even")
    B, T, _, Dh = x.shape
    ok_2d = cos.dim() == 2 and tuple(cos.shape) == (T, Dh // 2)
    ok_3d = cos.dim() == 3 and cos.shape[0] in (1, B) and tuple(cos.shape[1:]) == (T, Dh // 2)
    if cos.shape != sin.shape or not (ok_2d or ok_3d):
        raise ValueError(f"apply_rope: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must both be "
                         f"(T, Dh/2) = {(T, Dh // 2)} or (B, T, Dh/2) for {name} {tuple(x.shape)}")


def _launch_config(B: int, T: int, H: int, Dh: int) -> tuple[int, int, int, tuple[int, int, int], int]:
    """(BLOCK_T, BLOCK_H, BLOCK_P, grid, num_warps): all heads of a position in one tile when they fit, then
    more positions until the tile holds TILE_ELEMS elements."""
    BLOCK_D, _ = row_launch_config(Dh)  # next_power_of_2(Dh) = 2 * next_power_of_2(Dh / 2) as Dh is even
    BLOCK_H = min(triton.next_power_of_2(H), max(1, TILE_ELEMS // BLOCK_D))
    BLOCK_T = min(triton.next_power_of_2(T), max(1, TILE_ELEMS // (BLOCK_H * BLOCK_D)))
    grid = (triton.cdiv(T, BLOCK_T), B, triton.cdiv(H, BLOCK_H))  # t-blocks on axis 0: no 65535 limit there
    return BLOCK_T, BLOCK_H, BLOCK_D // 2, grid, num_warps_for(BLOCK_T * BLOCK_H * BLOCK_D)


def _rope(x: Tensor, cos: Tensor, sin: Tensor, backward: bool) -> Tensor:
    name = "dy" if backward else "x"
    _check(name, x, cos, sin)
    check_same_device(_rope_kernel, **{name: x}, cos=cos, sin=sin)
    B, T, H, Dh = x.shape
    y = torch.empty((B, T, H, Dh), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]  # (1, T, Dh/2)
    # a (1, T, Dh/2) table is shared by every batch row: stride 0 over b
    (scb, sct, scp), (ssb, sst, ssp) = cos.stride(), sin.stride()
    if cos.shape[0] == 1:
        scb = ssb = 0
    BLOCK_T, BLOCK_H, BLOCK_P, grid, num_warps = _launch_config(B, T, H, Dh)
    _rope_kernel[grid](x, cos, sin, y, T, H, Dh // 2, *x.stride(), scb, sct, scp, ssb, sst, ssp,
                       BLOCK_T=BLOCK_T, BLOCK_H=BLOCK_H, BLOCK_P=BLOCK_P, BACKWARD=backward, num_warps=num_warps)
    return y


def rope_fwd(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (B, T, H, Dh); cos, sin: (T, Dh/2) or (B|1, T, Dh/2) fp32 -> rotated x, (B, T, H, Dh) contiguous."""
    return _rope(x, cos, sin, backward=False)


def rope_bwd(dy: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """dy: (B, T, H, Dh) -> dx = dy rotated by -theta, (B, T, H, Dh) contiguous."""
    return _rope(dy, cos, sin, backward=True)


class RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        ctx.save_for_backward(cos, sin)  # the rotation is linear in x: backward needs only the tables
        return rope_fwd(x, cos, sin)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        cos, sin = ctx.saved_tensors
        return rope_bwd(dy, cos, sin), None, None


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (B, T, H, Dh); cos, sin: (T, Dh/2) or (B, T, Dh/2) fp32 -> (B, T, H, Dh) in x.dtype; same function
    as reference.apply_rope, differentiable in x only."""
    if torch.is_grad_enabled() and (getattr(cos, "requires_grad", False) or getattr(sin, "requires_grad", False)):
        raise ValueError("apply_rope: the kernel does not differentiate cos/sin; pass tables that do not "
                         "require grad, or use REFERENCE.apply_rope")
    return RoPEFunction.apply(x, cos, sin)
