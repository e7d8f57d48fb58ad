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
q and k in one launch (apply_rope_qk, apply_rope_qk_): grid axis 2 runs over q's head blocks, then k's (Hkv may
be fewer: GQA), with one tile shape; each of q and k is written to its own output, itself or a fresh tensor.
apply_rope_qk_ writes the rotation into q and k themselves through their strides (each element is read and
written by one program) and marks them dirty, saving up to two (B, T, H|Hkv, Dh) allocations per layer. Autograd
lets one node with two outputs dirty only non-views, so the node is recorded on the tensors that wq(x).view(...)
views whole (reference.in_place_owner); a view it cannot record (a slice, a transpose, the fused LoRA linear's
output, made inside its custom Function) gets a fresh output in the same launch. Backward is the same kernel with
BACKWARD=True into fresh gradient buffers (rope_qk_bwd says why not in place), again one launch. It is refused
under an active dispatch mode (selective checkpointing caches q's and k's storage): the model calls
apply_rope_qk there.
Refs: Su et al. 2021, "RoFormer" (rotary embeddings); meta-llama/llama llama/model.py, apply_rotary_emb.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

from llama_erc.kernels._utils import (TILE_ELEMS, cast_rne, check_float, check_same_device, in_place_safe,
                                       num_warps_for, overridden, row_launch_config)
from llama_erc.kernels.reference import in_place_owner


@triton.jit
def _rotate_tile(
    x_ptr, y_ptr, c, s,  # x, y (B, T, H, Dh) strided (y may be x: in place); c, s (BT, 1, BP) fp32 for this tile
    b, ts, hs, T, H, P,  # batch row, (BT,) positions and (BH,) heads of this tile, all int64
    stride_xb, stride_xt, stride_xh, stride_xd, stride_yb, stride_yt, stride_yh, stride_yd,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """y = x rotated by the tile's angles. Every element is loaded and stored by this program only, so y = x
    (in place) is safe for a tensor without internal overlap."""
    ds = tl.arange(0, 2 * BLOCK_P).to(tl.int64)
    mask = (ts < T)[:, None, None] & (hs < H)[None, :, None] & (ds < 2 * P)[None, None, :]
    t3, h3, d3 = ts[:, None, None], hs[None, :, None], ds[None, None, :]
    x = tl.load(x_ptr + b * stride_xb + t3 * stride_xt + h3 * stride_xh + d3 * stride_xd,
                mask=mask, other=0.0).to(tl.float32)  # (BT, BH, 2 BP)
    x0, x1 = tl.split(tl.reshape(x, (BLOCK_T, BLOCK_H, BLOCK_P, 2)))  # (BT, BH, BP) each: x[2i], x[2i+1]
    y = tl.join(x0 * c - x1 * s, x0 * s + x1 * c)  # (BT, BH, BP, 2): pairs interleaved again
    y = tl.reshape(y, (BLOCK_T, BLOCK_H, 2 * BLOCK_P))
    tl.store(y_ptr + b * stride_yb + t3 * stride_yt + h3 * stride_yh + d3 * stride_yd,
             cast_rne(y, y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_angles(cos_ptr, sin_ptr, b, ts, T, P, stride_cb, stride_ct, stride_cp, stride_sb, stride_st, stride_sp,
                 BLOCK_P: tl.constexpr, BACKWARD: tl.constexpr):
    """cos, sin of the tile's positions as (BT, 1, BP) fp32, shared by its heads; sin negated for backward."""
    ps = tl.arange(0, BLOCK_P).to(tl.int64)
    tmask = (ts < T)[:, None] & (ps < P)[None, :]
    c = tl.load(cos_ptr + b * stride_cb + ts[:, None] * stride_ct + ps[None, :] * stride_cp, mask=tmask, other=0.0)
    s = tl.load(sin_ptr + b * stride_sb + ts[:, None] * stride_st + ps[None, :] * stride_sp, mask=tmask, other=0.0)
    c, s = c.to(tl.float32)[:, None, :], s.to(tl.float32)[:, None, :]  # (BT, 1, BP)
    if BACKWARD:
        s = -s
    return c, s


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
    c, s = _load_angles(cos_ptr, sin_ptr, b, ts, T, P, stride_cb, stride_ct, stride_cp, stride_sb, stride_st,
                        stride_sp, BLOCK_P, BACKWARD)
    _rotate_tile(x_ptr, y_ptr, c, s, b, ts, hs, T, H, P, stride_xb, stride_xt, stride_xh, stride_xd,
                 T * H * 2 * P, H * 2 * P, 2 * P, 1, BLOCK_T, BLOCK_H, BLOCK_P)  # y contiguous


@triton.jit
def _rope_qk_kernel(
    q_ptr, k_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr,  # q (B, T, H, Dh), k (B, T, Hkv, Dh) strided; tables as
    T, H, HKV, P,  # above; qo, ko the outputs, strided: q and k themselves (in place) or fresh tensors
    stride_qb, stride_qt, stride_qh, stride_qd, stride_kb, stride_kt, stride_kh, stride_kd,
    stride_qob, stride_qot, stride_qoh, stride_qod, stride_kob, stride_kot, stride_koh, stride_kod,
    stride_cb, stride_ct, stride_cp, stride_sb, stride_st, stride_sp,
    N_Q_BLOCKS,  # cdiv(H, BLOCK_H): head blocks on grid axis 2 below it are q's, the rest k's
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr, BACKWARD: tl.constexpr,
):
    """q and k in one launch: grid axis 2 runs over q's head blocks, then k's; each program rotates one
    (BLOCK_T, BLOCK_H, Dh) tile of one of them with the angles of its positions."""
    ts = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    b = tl.program_id(1).to(tl.int64)
    hb = tl.program_id(2)
    c, s = _load_angles(cos_ptr, sin_ptr, b, ts, T, P, stride_cb, stride_ct, stride_cp, stride_sb, stride_st,
                        stride_sp, BLOCK_P, BACKWARD)
    if hb < N_Q_BLOCKS:
        hs = hb.to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
        _rotate_tile(q_ptr, qo_ptr, c, s, b, ts, hs, T, H, P, stride_qb, stride_qt, stride_qh, stride_qd,
                     stride_qob, stride_qot, stride_qoh, stride_qod, BLOCK_T, BLOCK_H, BLOCK_P)
    else:
        hs = (hb - N_Q_BLOCKS).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
        _rotate_tile(k_ptr, ko_ptr, c, s, b, ts, hs, T, HKV, P, stride_kb, stride_kt, stride_kh, stride_kd,
                     stride_kob, stride_kot, stride_koh, stride_kod, BLOCK_T, BLOCK_H, BLOCK_P)


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


def qk_launch_config(B: int, T: int, H: int, HKV: int, Dh: int, block_t: int | None = None,
                      num_warps: int | None = None) -> tuple[int, int, int, tuple[int, int, int], int]:
    """(BLOCK_T, BLOCK_H, BLOCK_P, grid, num_warps) for q (H heads) and k (HKV heads) in one launch. One tile
    shape for both: BLOCK_H fits the smaller head count, so under GQA k's tiles are as full as q's, and q takes
    H / BLOCK_H head blocks. block_t and num_warps override the defaults (the benchmark's sweep)."""
    BLOCK_D, _ = row_launch_config(Dh)
    BLOCK_H = min(triton.next_power_of_2(min(H, HKV)), max(1, TILE_ELEMS // BLOCK_D))
    BLOCK_T = min(triton.next_power_of_2(T), max(1, TILE_ELEMS // (BLOCK_H * BLOCK_D)))
    BLOCK_T, warps = overridden(BLOCK_T, num_warps_for(BLOCK_T * BLOCK_H * BLOCK_D), block_t, num_warps, "block_t")
    grid = (triton.cdiv(T, BLOCK_T), B, triton.cdiv(H, BLOCK_H) + triton.cdiv(HKV, BLOCK_H))
    return BLOCK_T, BLOCK_H, BLOCK_D // 2, grid, warps


def _check_qk(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, names: tuple[str, str]) -> None:
    _check(names[0], q, cos, sin)
    _check(names[1], k, cos, sin)
    if q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1] or q.dtype != k.dtype:
        raise ValueError(f"apply_rope_qk: {names[0]} {q.dtype} {tuple(q.shape)} and {names[1]} {k.dtype} "
                         f"{tuple(k.shape)} must share B, T, Dh and the dtype")
    check_same_device(_rope_qk_kernel, **{names[0]: q, names[1]: k}, cos=cos, sin=sin)


def _rope_qk(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, qo: Tensor, ko: Tensor, backward: bool,
             block_t: int | None = None, num_warps: int | None = None) -> None:
    """One launch: qo = q and ko = k rotated (by -theta when backward); qo, ko may be q, k themselves."""
    B, T, H, Dh = q.shape
    HKV = k.shape[2]
    if q.numel() + k.numel() == 0:
        return
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]  # (1, T, Dh/2)
    (scb, sct, scp), (ssb, sst, ssp) = cos.stride(), sin.stride()
    if cos.shape[0] == 1:
        scb = ssb = 0  # a (1, T, Dh/2) table is shared by every batch row
    BLOCK_T, BLOCK_H, BLOCK_P, grid, warps = qk_launch_config(B, T, H, HKV, Dh, block_t, num_warps)
    _rope_qk_kernel[grid](q, k, cos, sin, qo, ko, T, H, HKV, Dh // 2, *q.stride(), *k.stride(), *qo.stride(),
                          *ko.stride(), scb, sct, scp, ssb, sst, ssp, triton.cdiv(H, BLOCK_H),
                          BLOCK_T=BLOCK_T, BLOCK_H=BLOCK_H, BLOCK_P=BLOCK_P, BACKWARD=backward, num_warps=warps)


def _check_writable(name: str, x: Tensor) -> None:
    """In place needs each element stored once: no dim of size > 1 with stride 0 (an expand)."""
    if any(st == 0 and n > 1 for st, n in zip(x.stride(), x.shape)):
        raise ValueError(f"apply_rope_qk_: {name} {tuple(x.shape)} with strides {x.stride()} has elements that "
                         "share memory (an expanded tensor); rotate it out of place with apply_rope_qk")


def rope_qk_fwd_(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, block_t: int | None = None,
                 num_warps: int | None = None) -> tuple[Tensor, Tensor]:
    """Rotates q (B, T, H, Dh) and k (B, T, Hkv, Dh), any strides, in place in one launch -> (q, k)."""
    _check_qk(q, k, cos, sin, ("q", "k"))
    _check_writable("q", q)
    _check_writable("k", k)
    if q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr() and q.numel() and k.numel():
        raise ValueError("apply_rope_qk_: q and k share one storage (views of one fused projection?), where "
                         "the rotation of one could write into the other; rotate them with apply_rope_qk")
    _rope_qk(q, k, cos, sin, q, k, backward=False, block_t=block_t, num_warps=num_warps)
    return q, k


def rope_qk_bwd(dq: Tensor, dk: Tensor, cos: Tensor, sin: Tensor, block_t: int | None = None,
                num_warps: int | None = None) -> tuple[Tensor, Tensor]:
    """(dq, dk) rotated by -theta into fresh contiguous tensors, in one launch: the same kernel as the forward.

    Not in place into dq, dk: autograd does not hand a backward gradients it owns alone. When q's consumer is
    an add (q_rot + x), AddBackward passes one tensor as the gradient of both of its inputs, and writing the
    rotation into it would also change the gradient that x (or x's .grad, which may take that very tensor)
    receives. tests/kernels/test_rope_qk.py checks that case."""
    _check_qk(dq, dk, cos, sin, ("dq", "dk"))
    dqo = torch.empty(dq.shape, dtype=dq.dtype, device=dq.device)
    dko = torch.empty(dk.shape, dtype=dk.dtype, device=dk.device)
    _rope_qk(dq, dk, cos, sin, dqo, dko, backward=True, block_t=block_t, num_warps=num_warps)
    return dqo, dko


class RoPEQKFunction(torch.autograd.Function):
    """q and k rotated in one launch, each into a fresh tensor or in place (made dirty)."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor,
                shapes: tuple[torch.Size | None, torch.Size | None]) -> tuple[Tensor, Tensor]:
        """shapes[i]: None to rotate input i into a fresh tensor; else the (B, T, H|Hkv, Dh) shape of the
        caller's tensor, which input i is, or is viewed whole by (in_place_owner): rotated in place as that view."""
        ctx.save_for_backward(cos, sin)  # linear in q and k: backward needs only the tables
        ctx.shapes = shapes
        views = [x if shape is None else x.view(shape) for x, shape in zip((q, k), shapes)]
        _check_qk(*views, cos, sin, ("q", "k"))
        for name, v, shape in zip("qk", views, shapes):
            if shape is not None:
                _check_writable(name, v)
        outs = [v if shape is not None else torch.empty(v.shape, dtype=v.dtype, device=v.device)
                for v, shape in zip(views, shapes)]
        _rope_qk(*views, cos, sin, *outs, backward=False)
        ctx.mark_dirty(*[x for x, shape in zip((q, k), shapes) if shape is not None])  # bumps their versions
        return tuple(x if shape is not None else o for x, o, shape in zip((q, k), outs, shapes))

    @staticmethod
    @once_differentiable
    def backward(ctx, dq: Tensor, dk: Tensor):
        cos, sin = ctx.saved_tensors
        # an owner's gradient is rotated as the caller's (B, T, H, Dh) view (a whole view of a contiguous
        # tensor is its row-major reshape) and handed back in the owner's shape
        grads = [g if shape is None else g.reshape(shape) for g, shape in zip((dq, dk), ctx.shapes)]
        dq_in, dk_in = rope_qk_bwd(*grads, cos, sin)
        return dq_in.view(dq.shape), dk_in.view(dk.shape), None, None, None


def _no_table_grads(name: str, cos: Tensor, sin: Tensor) -> None:
    if torch.is_grad_enabled() and (getattr(cos, "requires_grad", False) or getattr(sin, "requires_grad", False)):
        raise ValueError(f"{name}: the kernel does not differentiate cos/sin; pass tables that do not "
                         "require grad, or use the REFERENCE twin")


def apply_rope_qk(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """q (B, T, H, Dh), k (B, T, Hkv, Dh); cos, sin (T, Dh/2) or (B, T, Dh/2) fp32 -> (apply_rope(q),
    apply_rope(k)) as fresh tensors, in one launch; same function as reference.apply_rope_qk."""
    _no_table_grads("apply_rope_qk", cos, sin)
    return RoPEQKFunction.apply(q, k, cos, sin, (None, None))  # both into fresh tensors


def apply_rope_qk_(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """apply_rope_qk written into q and k themselves where autograd allows it (reference.in_place_owner: not
    views, or whole views of contiguous tensors such as wq(x).view(B, T, H, Dh)), in one launch -> (q, k), the
    dirtied inputs. A view autograd could not record that way (a part of a fused projection, a transpose, a
    view made inside a custom Function such as the fused LoRA linear's output) is rotated into a fresh tensor
    in the same launch, returned in its place: use the returned pair. Without a graph every layout is written
    in place. Refused where an active dispatch mode may keep q or k for later (selective activation
    checkpointing; _utils.in_place_safe): call apply_rope_qk there."""
    _no_table_grads("apply_rope_qk_", cos, sin)
    if not in_place_safe():
        raise RuntimeError("apply_rope_qk_: refused under an active torch dispatch mode (selective activation "
                           "checkpointing keeps the matmul outputs q and k are views of, and would recompute "
                           "from rotated values); use the out-of-place apply_rope_qk")
    _check_qk(q, k, cos, sin, ("q", "k"))  # clear errors before anything is written
    for name, x in (("q", q), ("k", k)):
        leaf = x if x._base is None else x._base
        if leaf.is_leaf and leaf.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"apply_rope_qk_: {name} is (a view of) a leaf that requires grad, which autograd "
                             "cannot let an in-place op overwrite; rotate it with apply_rope_qk")
    if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)):
        rope_qk_fwd_(q, k, cos, sin)  # no graph to record the rotation in: any layout is written in place
        torch.autograd.graph.increment_version((q, k))  # as a torch in-place op: saved copies see the change
        return q, k
    owners = [in_place_owner(x) for x in (q, k)]
    if None not in owners and q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr() and q.numel():
        raise ValueError("apply_rope_qk_: q and k are one tensor (or two whole views of it), which one launch "
                         "would rotate twice; rotate them with apply_rope_qk")
    inputs = [x if o is None else o for x, o in zip((q, k), owners)]
    shapes = tuple(None if o is None else x.shape for x, o in zip((q, k), owners))
    outs = RoPEQKFunction.apply(*inputs, cos, sin, shapes)
    # a tensor written in place is returned as itself: the caller's view of an owner sees its new history
    return tuple(x if o is not None else out for x, o, out in zip((q, k), owners, outs))
