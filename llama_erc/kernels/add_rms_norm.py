"""Residual add + RMSNorm in one pass:  h = x + r,  y = (h * rstd).to(h.dtype) * w,  rstd = 1 / sqrt(mean(h^2) + eps).

The block's "h = h + attn_out; n2 = ffn_norm(h)" reads h back from memory right after writing it; here one
launch reads x and r once and writes both h (the residual stream, which later layers read) and y.
Cast points follow reference.add_rms_norm: the sum is taken in fp32 and rounded once to h.dtype =
promote_types(x, r), which is what torch's add does; the norm then runs on that rounded h exactly as in
rms_norm.py (fp32 math, x_hat rounded to h.dtype, scaled by w and rounded once to promote_types(h, w)).
Backward, with h_hat = h * rstd (fp32), g = dy * w and dh the gradient reaching h from its other uses (the
residual stream):
    dsum = rstd * (g - h_hat * mean(g * h_hat)) + dh     (the gradient of h, rounded once to h.dtype;
                                                          autograd would round the norm's part, then the sum)
    dx = dsum, dr = dsum                                 (the add passes it on: one tensor, as torch's add)
    dw = sum over rows of dy * h_hat                     (fp32 h_hat, as in rms_norm.py)
The backward IS rms_norm.py's backward launch on h, with dh read and added before its one rounding
(HAS_DRES): dw reduced the same way, one kernel for both ops. It re-reads h, not x and r, so only h and rstd
are saved.
Traffic (M rows of N, e = element size): fwd reads x, r (2MNe) and w, writes h, y (2MNe) and rstd (4M);
against the add then rms_norm it saves a read of h (MNe). bwd reads dy, dh, h (3MNe), w and rstd, writes dsum
(MNe); against rms_norm's backward then autograd's sum of the two gradients it saves the norm's gradient being
written and read back (2MNe).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

from llama_erc.kernels._utils import cast_rne, check_float, check_same_device
from llama_erc.kernels.rms_norm import _normalize_rows, launch_config, rms_norm_bwd


@triton.jit
def _add_rms_norm_fwd_kernel(
    x_ptr, r_ptr, w_ptr,  # (M, N) x.dtype, (M, N) r.dtype, (N,) w.dtype
    h_ptr, y_ptr, rstd_ptr,  # (M, N) h dtype, (M, N) y dtype (both contiguous), (M,) fp32
    M, N, eps,
    stride_xm, stride_xn, stride_rm, stride_rn, stride_w,  # element strides: x and r may be any 2-D views
    BLOCK_M: tl.constexpr,  # rows per program: > 1 only for narrow rows
    BLOCK_N: tl.constexpr,  # next_power_of_2(N): the whole row is in registers
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: M * N may pass 2**31
    cols = tl.arange(0, BLOCK_N).to(tl.int64)
    row_ok, col_ok = rows < M, cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xn, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + rows[:, None] * stride_rm + cols[None, :] * stride_rn, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols * stride_w, mask=col_ok, other=0.0).to(tl.float32)
    h = cast_rne(x + r, h_ptr.dtype.element_ty)  # the eager add: exact fp32 sum of two inputs, rounded once
    tl.store(h_ptr + rows[:, None] * N + cols[None, :], h, mask=mask)
    # the norm sees the rounded h, as rms_norm(x + r) does: rms_norm's own forward tail
    _normalize_rows(h.to(tl.float32), w, rows, cols, row_ok, mask, N, eps, h_ptr, y_ptr, rstd_ptr)


def _check(w: Tensor, **rows: Tensor) -> None:
    """Float tensors; the named row tensors all of the first one's shape (..., N) (no broadcasting); w (N,)."""
    for name, t in rows.items():
        check_float(name, t)
    check_float("weight", w)
    (first, t0), *rest = rows.items()
    for name, t in rest:
        if t.shape != t0.shape:
            raise ValueError(f"add_rms_norm: {name} {tuple(t.shape)} must have the shape of {first} "
                             f"{tuple(t0.shape)}")
    if t0.dim() < 1 or w.dim() != 1 or t0.shape[-1] != w.shape[0]:
        raise ValueError(f"add_rms_norm: weight {tuple(w.shape)} must be (N,) with N = {first}.shape[-1]; "
                         f"{first} is {tuple(t0.shape)}")


def add_rms_norm_fwd(x: Tensor, r: Tensor, w: Tensor, eps: float, block_m: int | None = None,
                     num_warps: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """x, r: (..., N), w: (N,) -> h (..., N) in promote_types(x, r), y (..., N) in promote_types(h, w),
    rstd (M,) fp32 with M = x.numel() / N."""
    _check(w, x=x, residual=r)
    check_same_device(_add_rms_norm_fwd_kernel, x=x, residual=r, weight=w)
    N = x.shape[-1]
    x2d, r2d = x.reshape(-1, N), r.reshape(-1, N)  # (M, N) each: views when the leading dims merge, else copies
    M = x2d.shape[0]
    BLOCK_M, BLOCK_N, num_warps = launch_config(M, N, block_m, num_warps)
    h_dtype = torch.promote_types(x.dtype, r.dtype)
    h = torch.empty((M, N), dtype=h_dtype, device=x.device)
    y = torch.empty((M, N), dtype=torch.promote_types(h_dtype, w.dtype), device=x.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    if M > 0:
        _add_rms_norm_fwd_kernel[(triton.cdiv(M, BLOCK_M),)](
            x2d, r2d, w, h, y, rstd, M, N, eps,
            x2d.stride(0), x2d.stride(1), r2d.stride(0), r2d.stride(1), w.stride(0),
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=num_warps)
    return h.view(x.shape), y.view(x.shape), rstd


def add_rms_norm_bwd(dy: Tensor, dh: Tensor | None, h: Tensor, w: Tensor, rstd: Tensor, need_dx: bool = True,
                     need_dw: bool = True, block_m: int | None = None,
                     num_warps: int | None = None) -> tuple[Tensor | None, Tensor | None]:
    """dy, dh (or None), h: (..., N), w: (N,), rstd: (M,) -> dsum (..., N) in h.dtype, the gradient of h that
    x and r both receive, or None; dw (N,) in w.dtype or None. RMSNorm's own backward launch with h's
    residual-stream gradient dh added before its one rounding (rms_norm.py, HAS_DRES)."""
    return rms_norm_bwd(dy, h, w, rstd, need_dx=need_dx, need_dw=need_dw, dres=dh, block_m=block_m,
                        num_warps=num_warps)


class AddRMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, r: Tensor, w: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        h, y, rstd = add_rms_norm_fwd(x, r, w, eps)
        ctx.save_for_backward(h, w, rstd)  # h, not x and r: the backward needs only the sum
        ctx.dtypes = (x.dtype, r.dtype, y.dtype)
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None, not as zeros to read
        return h, y

    @staticmethod
    @once_differentiable
    def backward(ctx, dh: Tensor | None, dy: Tensor | None):
        h, w, rstd = ctx.saved_tensors
        x_dtype, r_dtype, y_dtype = ctx.dtypes
        need_x, need_r, need_dw = ctx.needs_input_grad[:3]
        if dy is None:  # y unused: the norm contributes nothing (zeros keep the one kernel path)
            dy = torch.zeros(h.shape, dtype=y_dtype, device=h.device)
        dsum, dw = add_rms_norm_bwd(dy, dh, h, w, rstd, need_dx=need_x or need_r, need_dw=need_dw)
        # x and r get the same gradient, as from torch's add (.to is a no-op in the usual same-dtype case)
        dx = dsum.to(x_dtype) if need_x else None
        dr = dsum.to(r_dtype) if need_r else None
        return dx, dr, dw, None  # one entry per forward input; dw is None when the weight is frozen


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """x, residual: (..., N), weight: (N,) -> (h, y): h = x + residual in promote_types(x, residual) and
    y = rms_norm(h, weight, eps) in promote_types(h, weight); same function as reference.add_rms_norm."""
    return AddRMSNormFunction.apply(x, residual, weight, eps)
