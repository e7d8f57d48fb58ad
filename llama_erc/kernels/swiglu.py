"""SwiGLU gate of the LLaMA feed-forward:  y = silu(g) * u,  silu(g) = g * sigmoid(g).

Cast points: g and u are upcast to fp32, y is computed in fp32 and rounded once (to nearest even, cast_rne) to
the input dtype on store (reference.swiglu in bf16 rounds silu(g) first, then the product; the kernel is
closer to the fp32 result).
Backward, with s = sigmoid(g), recomputed from g instead of saving silu(g) (one fewer (M, F) tensor kept):
    du = dy * g * s                     dg = dy * u * s * (1 + g * (1 - s))
Layout: gate and up are read as 2-D (M, F) strided views, so the halves of a fused gate/up projection work
without a copy. A program owns a BLOCK_M x BLOCK_F tile; BLOCK_F is capped at MAX_BLOCK_F so wide FFN rows
(11008 for 7B, 28672 for 70B) are split over several programs instead of spilling registers.
Traffic (e = element size, M x F elements): fwd reads g, u and writes y: 3MFe. bwd reads dy, g, u and
writes dg, du: 5MFe.
Refs: Shazeer 2020, "GLU Variants Improve Transformer"; meta-llama/llama llama/model.py, FeedForward.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

from llama_erc.kernels._utils import TILE_ELEMS, cast_rne, check_float, check_same_device, num_warps_for

MAX_BLOCK_F = 1024  # 11008 = 10.75 x 1024: the masked tail idles 2% of the lanes


@triton.jit
def _sigmoid(g):
    """1 / (1 + exp(-g)) from exp(-|g|) <= 1: no overflow to inf for very negative g (fp32 throughout)."""
    e = tl.exp(-tl.abs(g))
    return tl.where(g >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _swiglu_fwd_kernel(
    g_ptr, u_ptr, y_ptr,  # (M, F) strided, (M, F) strided, (M, F) contiguous
    M, F,
    stride_gm, stride_gf, stride_um, stride_uf,
    BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: M * F may pass 2**31
    cols = tl.program_id(1).to(tl.int64) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (rows < M)[:, None] & (cols < F)[None, :]
    r, c = rows[:, None], cols[None, :]
    g = tl.load(g_ptr + r * stride_gm + c * stride_gf, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + r * stride_um + c * stride_uf, mask=mask, other=0.0).to(tl.float32)
    s = _sigmoid(g)
    tl.store(y_ptr + r * F + c, cast_rne(g * s * u, y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    dy_ptr, g_ptr, u_ptr, dg_ptr, du_ptr,  # (M, F) strided x3, then contiguous (M, F) x2
    M, F,
    stride_dym, stride_dyf, stride_gm, stride_gf, stride_um, stride_uf,
    BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (rows < M)[:, None] & (cols < F)[None, :]
    r, c = rows[:, None], cols[None, :]
    dy = tl.load(dy_ptr + r * stride_dym + c * stride_dyf, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + r * stride_gm + c * stride_gf, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + r * stride_um + c * stride_uf, mask=mask, other=0.0).to(tl.float32)
    s = _sigmoid(g)  # recomputed, not saved
    du = dy * g * s
    dg = dy * u * s * (1.0 + g * (1.0 - s))  # d silu / dg = s + g s (1 - s)
    tl.store(dg_ptr + r * F + c, cast_rne(dg, dg_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + r * F + c, cast_rne(du, du_ptr.dtype.element_ty), mask=mask)


def _launch_config(M: int, F: int) -> tuple[int, int, tuple[int, int], int]:
    """(BLOCK_M, BLOCK_F, grid, num_warps) for an (M, F) elementwise pass."""
    BLOCK_F = min(triton.next_power_of_2(F), MAX_BLOCK_F)
    BLOCK_M = min(triton.next_power_of_2(max(M, 1)), max(1, TILE_ELEMS // BLOCK_F))
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(F, BLOCK_F))  # rows on axis 0: its limit is 2**31 - 1
    return BLOCK_M, BLOCK_F, grid, num_warps_for(BLOCK_M * BLOCK_F)


def _as_rows(name: str, t: Tensor, shape: torch.Size) -> Tensor:
    check_float(name, t)
    if t.shape != shape or t.dim() == 0:
        raise ValueError(f"swiglu: {name} {tuple(t.shape)} must have the shape of gate {tuple(shape)}, "
                         "with at least one dim")
    return t.reshape(-1, max(shape[-1], 1))  # (M, F): a view when possible; F = 0 only when empty


def swiglu_fwd(gate: Tensor, up: Tensor) -> Tensor:
    """gate, up: (..., F) of one dtype -> silu(gate) * up, (..., F) contiguous."""
    g2d, u2d = _as_rows("gate", gate, gate.shape), _as_rows("up", up, gate.shape)
    if gate.dtype != up.dtype:
        raise ValueError(f"swiglu: gate is {gate.dtype} but up is {up.dtype}; pass one dtype")
    check_same_device(_swiglu_fwd_kernel, gate=gate, up=up)
    M, F = g2d.shape
    y = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)  # contiguous, so its (M, F) view is too
    if y.numel() > 0:
        BLOCK_M, BLOCK_F, grid, num_warps = _launch_config(M, F)
        _swiglu_fwd_kernel[grid](g2d, u2d, y.view(M, F), M, F, *g2d.stride(), *u2d.stride(),
                                 BLOCK_M=BLOCK_M, BLOCK_F=BLOCK_F, num_warps=num_warps)
    return y


def swiglu_bwd(dy: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    """dy, gate, up: (..., F) -> (dgate, dup), each (..., F) in the input dtype."""
    g2d, u2d = _as_rows("gate", gate, gate.shape), _as_rows("up", up, gate.shape)
    dy2d = _as_rows("dy", dy, gate.shape)
    check_same_device(_swiglu_bwd_kernel, dy=dy, gate=gate, up=up)
    M, F = g2d.shape
    dg = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    du = torch.empty(up.shape, dtype=up.dtype, device=up.device)
    if dg.numel() > 0:
        BLOCK_M, BLOCK_F, grid, num_warps = _launch_config(M, F)
        _swiglu_bwd_kernel[grid](dy2d, g2d, u2d, dg.view(M, F), du.view(M, F), M, F,
                                 *dy2d.stride(), *g2d.stride(), *u2d.stride(),
                                 BLOCK_M=BLOCK_M, BLOCK_F=BLOCK_F, num_warps=num_warps)
    return dg, du


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor) -> Tensor:
        ctx.save_for_backward(gate, up)  # the inputs only: silu(gate) is recomputed in backward
        return swiglu_fwd(gate, up)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        gate, up = ctx.saved_tensors
        return swiglu_bwd(dy, gate, up)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """gate, up: (..., F) -> silu(gate) * up, (..., F); same function as reference.swiglu."""
    return SwiGLUFunction.apply(gate, up)
