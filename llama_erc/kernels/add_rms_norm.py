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
dw is reduced as in rms_norm.py, whose launch configuration and DW_PROGRAMS this module shares: each program
keeps an fp32 partial row over a contiguous run of row tiles and the host sums the (n_programs, N) partials;
with a frozen w (LoRA) HAS_DW=False and one program per tile. The backward re-reads h, not x and r, so only
h and rstd are saved.
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
from llama_erc.kernels.rms_norm import DW_PROGRAMS, _launch_config


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
    h = h.to(tl.float32)  # the norm sees the rounded h, as rms_norm(x + r) does
    rstd = tl.rsqrt(tl.sum(h * h, axis=1) / N + eps)  # (BLOCK_M,); padded lanes are 0 and add nothing
    h_hat = cast_rne(h * rstd[:, None], h_ptr.dtype.element_ty).to(tl.float32)  # the reference's .to(h.dtype)
    y = cast_rne(h_hat * w[None, :], y_ptr.dtype.element_ty)  # fp32 product, rounded once like torch's multiply
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)
    tl.store(y_ptr + rows[:, None] * N + cols[None, :], y, mask=mask)


@triton.jit
def _add_rms_norm_bwd_kernel(
    dy_ptr, dh_ptr, h_ptr, w_ptr, rstd_ptr,  # (M, N) y dtype, (M, N) h dtype, (M, N), (N,), (M,) fp32
    dsum_ptr, dw_ptr,  # (M, N) h dtype contiguous, (n_programs, N) fp32 partial rows
    M, N, n_tiles, tiles_per_program,  # n_tiles = cdiv(M, BLOCK_M); each program owns a contiguous run
    stride_dym, stride_dyn, stride_dhm, stride_dhn, stride_hm, stride_hn, stride_w,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_DH: tl.constexpr,  # False when h's other uses gave no gradient: dsum is the norm's part alone
    HAS_DX: tl.constexpr,  # False when neither x nor r needs grad
    HAS_DW: tl.constexpr,  # False when w is frozen: no partials written
):
    pid = tl.program_id(0).to(tl.int64)
    first = pid * tiles_per_program
    cols = tl.arange(0, BLOCK_N).to(tl.int64)
    col_ok = cols < N
    w = tl.load(w_ptr + cols * stride_w, mask=col_ok, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for i in range(tl.minimum(tiles_per_program, n_tiles - first)):
        rows = (first + i) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        mask = row_ok[:, None] & col_ok[None, :]
        h = tl.load(h_ptr + rows[:, None] * stride_hm + cols[None, :] * stride_hn, mask=mask, other=0.0)
        h = h.to(tl.float32)
        dy = tl.load(dy_ptr + rows[:, None] * stride_dym + cols[None, :] * stride_dyn, mask=mask, other=0.0)
        dy = dy.to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)  # (BLOCK_M,); 0 on padded rows
        h_hat = h * rstd[:, None]
        if HAS_DX:
            g = dy * w[None, :]
            c = tl.sum(g * h_hat, axis=1) / N  # (BLOCK_M,) mean(g * h_hat)
            dsum = rstd[:, None] * (g - h_hat * c[:, None])
            if HAS_DH:  # the residual stream's gradient, added in fp32 before the one rounding
                dh = tl.load(dh_ptr + rows[:, None] * stride_dhm + cols[None, :] * stride_dhn, mask=mask, other=0.0)
                dsum += dh.to(tl.float32)
            tl.store(dsum_ptr + rows[:, None] * N + cols[None, :], cast_rne(dsum, dsum_ptr.dtype.element_ty),
                     mask=mask)
        if HAS_DW:
            dw_acc += tl.sum(dy * h_hat, axis=0)  # fp32 h_hat: see rms_norm.py's docstring
    if HAS_DW:
        tl.store(dw_ptr + pid * N + cols, dw_acc, mask=col_ok)


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


def add_rms_norm_fwd(x: Tensor, r: Tensor, w: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """x, r: (..., N), w: (N,) -> h (..., N) in promote_types(x, r), y (..., N) in promote_types(h, w),
    rstd (M,) fp32 with M = x.numel() / N."""
    _check(w, x=x, residual=r)
    check_same_device(_add_rms_norm_fwd_kernel, x=x, residual=r, weight=w)
    N = x.shape[-1]
    x2d, r2d = x.reshape(-1, N), r.reshape(-1, N)  # (M, N) each: views when the leading dims merge, else copies
    M = x2d.shape[0]
    BLOCK_M, BLOCK_N, num_warps = _launch_config(M, N)
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
                     need_dw: bool = True) -> tuple[Tensor | None, Tensor | None]:
    """dy, dh (or None), h: (..., N), w: (N,), rstd: (M,) -> dsum (..., N) in h.dtype, the gradient of h that
    x and r both receive, or None; dw (N,) in w.dtype or None."""
    grads = {"dy": dy} if dh is None else {"dy": dy, "dh": dh}
    _check(w, h=h, **grads)
    if rstd.shape != (h.numel() // max(h.shape[-1], 1),):
        raise ValueError(f"add_rms_norm backward: rstd {tuple(rstd.shape)} must have one value per row of h "
                         f"{tuple(h.shape)}")
    check_same_device(_add_rms_norm_bwd_kernel, h=h, weight=w, rstd=rstd, **grads)
    N = h.shape[-1]
    h2d, dy2d = h.reshape(-1, N), dy.reshape(-1, N)  # (M, N) each; strided views are read as they are
    dh2d = dy2d if dh is None else dh.reshape(-1, N)  # unused when dh is None (HAS_DH=False)
    M = h2d.shape[0]
    BLOCK_M, BLOCK_N, num_warps = _launch_config(M, N)
    n_tiles = triton.cdiv(M, BLOCK_M)
    # as rms_norm_bwd: one tile per program without dw; with dw, few programs, each reducing a run of tiles
    tiles_per_program = triton.cdiv(n_tiles, DW_PROGRAMS) if need_dw else 1
    n_programs = triton.cdiv(n_tiles, tiles_per_program) if n_tiles else 0
    dsum = torch.empty((M, N), dtype=h.dtype, device=h.device) if need_dx else None
    partial = torch.zeros((n_programs, N), dtype=torch.float32, device=h.device) if need_dw else None
    if n_programs > 0:
        _add_rms_norm_bwd_kernel[(n_programs,)](
            dy2d, dh2d, h2d, w, rstd, h2d if dsum is None else dsum, rstd if partial is None else partial,
            M, N, n_tiles, tiles_per_program,
            dy2d.stride(0), dy2d.stride(1), dh2d.stride(0), dh2d.stride(1), h2d.stride(0), h2d.stride(1),
            w.stride(0),
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, HAS_DH=dh is not None, HAS_DX=need_dx, HAS_DW=need_dw,
            num_warps=num_warps)
    dw = partial.sum(0).to(w.dtype) if need_dw else None  # (N,): host-side sum of the fp32 partial rows
    return (dsum.view(h.shape) if need_dx else None), dw


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
