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
swiglu_ is the same op whose backward runs a flat kernel over the N = M x F elements of dense gate and up (no
rows, so no masked row tails) and writes dg over gate and du over up: they are dead after the backward, and
this saves two (M, F) allocations per layer (2 x 86 MiB at 7B, 8 x 512 tokens, bf16). Same traffic, same bits as
the row kernel (one _swiglu_grads helper). It is refused under an active dispatch mode (selective
checkpointing caches gate and up), and autograd's version check refuses a second backward (retain_graph).
Refs: Shazeer 2020, "GLU Variants Improve Transformer"; meta-llama/llama llama/model.py, FeedForward.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

from llama_erc.kernels._utils import (TILE_ELEMS, cast_rne, check_float, check_same_device, in_place_safe,
                                       num_warps_for, overridden)

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
def _swiglu_grads(dy, g, u):
    """(dg, du) in fp32 from fp32 dy, g, u; silu is recomputed from g, not saved."""
    s = _sigmoid(g)
    du = dy * g * s
    dg = dy * u * s * (1.0 + g * (1.0 - s))  # d silu / dg = s + g s (1 - s)
    return dg, du


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
    dg, du = _swiglu_grads(dy, g, u)
    tl.store(dg_ptr + r * F + c, cast_rne(dg, dg_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + r * F + c, cast_rne(du, du_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_flat_kernel(
    dy_ptr, g_ptr, u_ptr,  # (N,) contiguous each; dg_ptr is g_ptr and du_ptr is u_ptr: written in place
    N,
    BLOCK: tl.constexpr,  # elements per program
):
    """The backward over the flat element range of dense tensors, no rows: every program but the last is
    unmasked, whatever F is. Each element is read and then overwritten by the same program."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64: N may pass 2**31
    mask = offs < N
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dg, du = _swiglu_grads(dy, g, u)
    tl.store(g_ptr + offs, cast_rne(dg, g_ptr.dtype.element_ty), mask=mask)
    tl.store(u_ptr + offs, cast_rne(du, u_ptr.dtype.element_ty), mask=mask)


def launch_config(M: int, F: int, block_m: int | None = None,
                   num_warps: int | None = None) -> tuple[int, int, tuple[int, int], int]:
    """(BLOCK_M, BLOCK_F, grid, num_warps) for an (M, F) elementwise pass; block_m (rows per program) and
    num_warps override the defaults (the benchmark's sweep)."""
    BLOCK_F = min(triton.next_power_of_2(F), MAX_BLOCK_F)
    BLOCK_M = min(triton.next_power_of_2(max(M, 1)), max(1, TILE_ELEMS // BLOCK_F))
    BLOCK_M, warps = overridden(BLOCK_M, num_warps_for(BLOCK_M * BLOCK_F), block_m, num_warps, "block_m")
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(F, BLOCK_F))  # rows on axis 0: its limit is 2**31 - 1
    return BLOCK_M, BLOCK_F, grid, warps


def _as_rows(name: str, t: Tensor, shape: torch.Size) -> Tensor:
    check_float(name, t)
    if t.shape != shape or t.dim() == 0:
        raise ValueError(f"swiglu: {name} {tuple(t.shape)} must have the shape of gate {tuple(shape)}, "
                         "with at least one dim")
    return t.reshape(-1, max(shape[-1], 1))  # (M, F): a view when possible; F = 0 only when empty


def swiglu_fwd(gate: Tensor, up: Tensor, block_m: int | None = None, num_warps: int | None = None) -> Tensor:
    """gate, up: (..., F) of one dtype -> silu(gate) * up, (..., F) contiguous."""
    g2d, u2d = _as_rows("gate", gate, gate.shape), _as_rows("up", up, gate.shape)
    if gate.dtype != up.dtype:
        raise ValueError(f"swiglu: gate is {gate.dtype} but up is {up.dtype}; pass one dtype")
    check_same_device(_swiglu_fwd_kernel, gate=gate, up=up)
    M, F = g2d.shape
    y = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)  # contiguous, so its (M, F) view is too
    if y.numel() > 0:
        BLOCK_M, BLOCK_F, grid, num_warps = launch_config(M, F, block_m, num_warps)
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
        BLOCK_M, BLOCK_F, grid, num_warps = launch_config(M, F)
        _swiglu_bwd_kernel[grid](dy2d, g2d, u2d, dg.view(M, F), du.view(M, F), M, F,
                                 *dy2d.stride(), *g2d.stride(), *u2d.stride(),
                                 BLOCK_M=BLOCK_M, BLOCK_F=BLOCK_F, num_warps=num_warps)
    return dg, du


def bwd_in_place_possible(gate: Tensor, up: Tensor) -> bool:
    """swiglu_'s backward may overwrite gate and up: both dense (the flat range is exactly their elements), in
    separate storages (a fused projection's halves are strided anyway; swiglu_(x, x) would write twice), and
    results of ops, neither leaves nor views of leaves (a leaf is the user's tensor: a parameter, an input)."""
    def op_output(t: Tensor) -> bool:
        return not t.is_leaf and (t._base is None or not t._base.is_leaf)

    return (gate.is_contiguous() and up.is_contiguous() and op_output(gate) and op_output(up)
            and gate.untyped_storage().data_ptr() != up.untyped_storage().data_ptr())


def swiglu_bwd_(dy: Tensor, gate: Tensor, up: Tensor, block: int | None = None,
                num_warps: int | None = None) -> tuple[Tensor, Tensor]:
    """dy, gate, up: (..., F) -> (gate, up) holding (dgate, dup): the flat kernel, written over gate and up.

    gate and up must be dense and in separate storages (whether they may be overwritten is the caller's
    decision: bwd_in_place_possible); dy of any layout (copied when not contiguous). block and
    num_warps override the defaults (the benchmark's sweep)."""
    for name, t in (("gate", gate), ("up", up), ("dy", dy)):
        _as_rows(name, t, gate.shape)  # the checks only: the flat kernel needs no (M, F) view
    if gate.dtype != up.dtype:
        raise ValueError(f"swiglu: gate is {gate.dtype} but up is {up.dtype}; pass one dtype")
    if not (gate.is_contiguous() and up.is_contiguous()
            and gate.untyped_storage().data_ptr() != up.untyped_storage().data_ptr()):
        raise ValueError(f"swiglu_bwd_: gate {tuple(gate.shape)} strides {gate.stride()} and up strides "
                         f"{up.stride()} must be contiguous and in separate storages to be overwritten")
    check_same_device(_swiglu_bwd_flat_kernel, dy=dy, gate=gate, up=up)
    n = gate.numel()
    if n > 0:
        block, warps = overridden(TILE_ELEMS, num_warps_for(TILE_ELEMS), block, num_warps, "swiglu_bwd_: block")
        _swiglu_bwd_flat_kernel[(triton.cdiv(n, block),)](dy.contiguous(), gate, up, n, BLOCK=block,
                                                         num_warps=warps)
    return gate, up


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor, in_place_backward: bool) -> Tensor:
        ctx.save_for_backward(gate, up)  # the inputs only: silu(gate) is recomputed in backward
        ctx.in_place = in_place_backward and bwd_in_place_possible(gate, up)
        return swiglu_fwd(gate, up)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        gate, up = ctx.saved_tensors
        if not ctx.in_place:
            return *swiglu_bwd(dy, gate, up), None
        dg, du = swiglu_bwd_(dy, gate, up)
        # gate and up now hold their gradients: bump their versions, so that a second backward through a
        # retained graph fails autograd's saved-tensor check instead of reading gradients as activations
        torch.autograd.graph.increment_version((gate, up))
        return dg, du, None


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """gate, up: (..., F) -> silu(gate) * up, (..., F); same function as reference.swiglu."""
    return SwiGLUFunction.apply(gate, up, False)


def swiglu_(gate: Tensor, up: Tensor) -> Tensor:
    """swiglu whose backward writes dgate and dup over the saved gate and up (trailing _ as torch's: it writes
    into its inputs), saving two (..., F) allocations per layer; they are the gradients returned. For inputs
    that nothing else reads after this op (the model's w1/w3 outputs); retain_graph is refused by autograd's
    version check. Strided or aliased gate/up (bwd_in_place_possible) fall back to fresh gradients. Refused
    under an active dispatch mode (selective checkpointing caches gate and up: _utils.in_place_safe)."""
    if not in_place_safe():
        raise RuntimeError("swiglu_: refused under an active torch dispatch mode (selective activation "
                           "checkpointing keeps gate and up, the matmul outputs its backward would overwrite); "
                           "use swiglu")
    return SwiGLUFunction.apply(gate, up, True)
