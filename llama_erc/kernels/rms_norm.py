"""RMSNorm over the last dim:  y = (x * rstd).to(x.dtype) * w,  rstd = 1 / sqrt(mean(x^2) + eps).

Cast points follow reference.rms_norm (Meta's): x is upcast to fp32, normalised, rounded to x.dtype, then
scaled by w in the promoted dtype of x and w. The kernel does the scale in fp32 on the rounded x_hat and casts
once on store; that is what torch does for one elementwise multiply, so the rounding is the same. Every
rounding goes through _utils.cast_rne (round to nearest even, on the GPU and in the interpreter alike).
Backward, with x_hat = x * rstd (fp32) and g = dy * w, treating the x.dtype rounding as the identity like autograd:
    dx = rstd * (g - x_hat * mean(g * x_hat))            (mean over the row)
    dw = sum over rows of dy * x_hat                     (the fp32 x_hat of the spec: reusing the bf16-rounded
                                                          x_hat adds an error per row to a sum that can cancel;
                                                          it broke the bf16 dw tolerance at 64 x 256)
dw is reduced without atomics: each backward program loops over a contiguous run of row tiles, keeps an fp32
partial row in registers and writes it once to an (n_programs, N) buffer that the host sums. When w is frozen
(LoRA) the backward is launched with HAS_DW=False, skips that work and uses one program per tile.
Traffic (bytes that must move, M rows of N, e = x element size): fwd reads x (MNe) and w, writes y (MNe)
and rstd (4M). bwd reads dy, x, w, rstd, writes dx; with dw it also writes and re-reads the fp32 partials
(n_programs x N x 4, a few % of the rest).
Refs: Zhang & Sennrich 2019, "Root Mean Square Layer Normalization"; meta-llama/llama llama/model.py, RMSNorm.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

from llama_erc.kernels._utils import (cast_rne, check_float, check_same_device, num_warps_for, overridden,
                                       row_launch_config, rows_per_tile)

DW_PROGRAMS = 256  # programs that share the dw reduction: partials stay small, yet enough to fill a GPU


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr, w_ptr, y_ptr, rstd_ptr,  # (M, N) x.dtype, (N,) w.dtype, (M, N) out dtype (contiguous), (M,) fp32
    M, N, eps,
    stride_xm, stride_xn, stride_w,  # element strides: x may be any 2-D view
    BLOCK_M: tl.constexpr,  # rows per program: > 1 only for narrow rows
    BLOCK_N: tl.constexpr,  # next_power_of_2(N): the whole row is in registers
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: M * N may pass 2**31
    cols = tl.arange(0, BLOCK_N).to(tl.int64)
    row_ok, col_ok = rows < M, cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xn, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols * stride_w, mask=col_ok, other=0.0).to(tl.float32)
    _normalize_rows(x, w, rows, cols, row_ok, mask, N, eps, x_ptr, y_ptr, rstd_ptr)


@triton.jit
def _normalize_rows(x, w, rows, cols, row_ok, mask, N, eps, x_ptr, y_ptr, rstd_ptr):
    """The forward's norm of a (BLOCK_M, BLOCK_N) tile: x fp32 (the input's values), w (BLOCK_N,) fp32; stores
    y (contiguous rows of N) and rstd. Shared with add_rms_norm.py, whose x is the rounded sum h (x_ptr: h's)."""
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / N + eps)  # (BLOCK_M,); padded lanes are 0 and add nothing
    x_hat = cast_rne(x * rstd[:, None], x_ptr.dtype.element_ty).to(tl.float32)  # the reference's .to(x.dtype)
    y = cast_rne(x_hat * w[None, :], y_ptr.dtype.element_ty)  # fp32 product, rounded once like torch's multiply
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)
    tl.store(y_ptr + rows[:, None] * N + cols[None, :], y, mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr, x_ptr, w_ptr, rstd_ptr, dres_ptr,  # (M, N) out dtype, (M, N) x.dtype, (N,), (M,) fp32, (M, N)
    dx_ptr, dw_ptr,  # (M, N) x.dtype contiguous, (n_programs, N) fp32 partial rows
    M, N, n_tiles, tiles_per_program,  # n_tiles = cdiv(M, BLOCK_M); each program owns a contiguous run
    stride_dym, stride_dyn, stride_xm, stride_xn, stride_w, stride_drm, stride_drn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_DX: tl.constexpr,  # False when x needs no grad
    HAS_DW: tl.constexpr,  # False when w is frozen: no partials written
    HAS_DRES: tl.constexpr,  # x's own gradient from its other uses (add_rms_norm.py's residual stream), added
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
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xn, mask=mask, other=0.0)
        x = x.to(tl.float32)
        dy = tl.load(dy_ptr + rows[:, None] * stride_dym + cols[None, :] * stride_dyn, mask=mask, other=0.0)
        dy = dy.to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)  # (BLOCK_M,); 0 on padded rows
        x_hat = x * rstd[:, None]
        if HAS_DX:
            g = dy * w[None, :]
            c = tl.sum(g * x_hat, axis=1) / N  # (BLOCK_M,) mean(g * x_hat)
            dx = rstd[:, None] * (g - x_hat * c[:, None])
            if HAS_DRES:  # added in fp32, before the one rounding
                dres = tl.load(dres_ptr + rows[:, None] * stride_drm + cols[None, :] * stride_drn, mask=mask,
                               other=0.0)
                dx += dres.to(tl.float32)
            dx = cast_rne(dx, dx_ptr.dtype.element_ty)
            tl.store(dx_ptr + rows[:, None] * N + cols[None, :], dx, mask=mask)
        if HAS_DW:
            dw_acc += tl.sum(dy * x_hat, axis=0)  # fp32 x_hat: see the module docstring
    if HAS_DW:
        tl.store(dw_ptr + pid * N + cols, dw_acc, mask=col_ok)


def launch_config(M: int, N: int, block_m: int | None = None,
                   num_warps: int | None = None) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): whole rows, stacked up to a tile of TILE_ELEMS; block_m (rows per
    program) and num_warps override the defaults (the benchmark's sweep, benchmarks/kernel_sweep.py)."""
    BLOCK_N, _ = row_launch_config(N)
    BLOCK_M = rows_per_tile(BLOCK_N, M)
    BLOCK_M, warps = overridden(BLOCK_M, num_warps_for(BLOCK_M * BLOCK_N), block_m, num_warps, "block_m")
    return BLOCK_M, BLOCK_N, warps


def _check(x: Tensor, w: Tensor) -> None:
    check_float("x", x)
    check_float("weight", w)
    if x.dim() < 1 or w.dim() != 1 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"rms_norm: weight {tuple(w.shape)} must be (N,) with N = x.shape[-1]; "
                         f"x is {tuple(x.shape)}")


def rms_norm_fwd(x: Tensor, w: Tensor, eps: float, block_m: int | None = None,
                 num_warps: int | None = None) -> tuple[Tensor, Tensor]:
    """x: (..., N), w: (N,) -> y (..., N) in promote_types(x, w), rstd (M,) fp32 with M = x.numel() / N."""
    _check(x, w)
    check_same_device(_rms_norm_fwd_kernel, x=x, weight=w)
    N = x.shape[-1]
    x2d = x.reshape(-1, N)  # (M, N): a view when the leading dims merge, else a copy
    M = x2d.shape[0]
    BLOCK_M, BLOCK_N, num_warps = launch_config(M, N, block_m, num_warps)
    y = torch.empty((M, N), dtype=torch.promote_types(x.dtype, w.dtype), device=x.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    if M > 0:
        _rms_norm_fwd_kernel[(triton.cdiv(M, BLOCK_M),)](
            x2d, w, y, rstd, M, N, eps, x2d.stride(0), x2d.stride(1), w.stride(0),
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=num_warps)
    return y.view(x.shape), rstd


def rms_norm_bwd(dy: Tensor, x: Tensor, w: Tensor, rstd: Tensor, need_dx: bool = True,
                 need_dw: bool = True, dres: Tensor | None = None, block_m: int | None = None,
                 num_warps: int | None = None) -> tuple[Tensor | None, Tensor | None]:
    """dy, x: (..., N), w: (N,), rstd: (M,) -> dx (..., N) in x.dtype or None, dw (N,) in w.dtype or None.

    dres (..., N), optional: a gradient x receives from elsewhere (the residual stream, add_rms_norm.py), added
    to dx in the same launch."""
    _check(x, w)
    check_float("dy", dy)
    if dres is not None:
        check_float("dres", dres)
    if dy.shape != x.shape or rstd.shape != (x.numel() // max(x.shape[-1], 1),) or (
            dres is not None and dres.shape != x.shape):
        raise ValueError(f"rms_norm backward: dy {tuple(dy.shape)}, rstd {tuple(rstd.shape)}"
                         + ("" if dres is None else f" and dres {tuple(dres.shape)}")
                         + f" do not match x {tuple(x.shape)}")
    check_same_device(_rms_norm_bwd_kernel, dy=dy, x=x, weight=w, rstd=rstd,
                      **({} if dres is None else {"dres": dres}))
    N = x.shape[-1]
    x2d, dy2d = x.reshape(-1, N), dy.reshape(-1, N)  # (M, N) each; strided views are read as they are
    dres2d = dy2d if dres is None else dres.reshape(-1, N)  # unused when dres is None (HAS_DRES=False)
    M = x2d.shape[0]
    BLOCK_M, BLOCK_N, num_warps = launch_config(M, N, block_m, num_warps)
    n_tiles = triton.cdiv(M, BLOCK_M)
    # without dw: one tile per program for full parallelism; with dw: few programs, each reducing a run of tiles
    tiles_per_program = triton.cdiv(n_tiles, DW_PROGRAMS) if need_dw else 1
    n_programs = triton.cdiv(n_tiles, tiles_per_program) if n_tiles else 0
    dx = torch.empty((M, N), dtype=x.dtype, device=x.device) if need_dx else None
    partial = torch.zeros((n_programs, N), dtype=torch.float32, device=x.device) if need_dw else None
    if n_programs > 0:
        _rms_norm_bwd_kernel[(n_programs,)](
            dy2d, x2d, w, rstd, dres2d, x2d if dx is None else dx, rstd if partial is None else partial,  # unused if off
            M, N, n_tiles, tiles_per_program,
            dy2d.stride(0), dy2d.stride(1), x2d.stride(0), x2d.stride(1), w.stride(0), dres2d.stride(0),
            dres2d.stride(1),
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, HAS_DX=need_dx, HAS_DW=need_dw, HAS_DRES=dres is not None,
            num_warps=num_warps)
    dw = partial.sum(0).to(w.dtype) if need_dw else None  # (N,): host-side sum of the fp32 partial rows
    return (dx.view(x.shape) if need_dx else None), dw


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, eps: float) -> Tensor:
        y, rstd = rms_norm_fwd(x, w, eps)
        ctx.save_for_backward(x, w, rstd)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        x, w, rstd = ctx.saved_tensors
        dx, dw = rms_norm_bwd(dy, x, w, rstd, need_dx=ctx.needs_input_grad[0], need_dw=ctx.needs_input_grad[1])
        return dx, dw, None  # one entry per forward input; dw is None when the weight is frozen


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-5) -> Tensor:
    """x: (..., N), weight: (N,) -> (..., N) in promote_types(x.dtype, weight.dtype); same function as
    reference.rms_norm."""
    return RMSNormFunction.apply(x, weight, eps)
