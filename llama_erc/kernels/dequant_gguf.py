"""Dequantization of GGUF quantized blocks (Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K) as Triton kernels.

The spec is reference_gguf: its docstring gives each type's block layout, element order and math; the kernels
compute the same fp32 values bit for bit and round them once into the output dtype (fp32, bf16 or fp16, through
_utils.cast_rne: round to nearest even on the GPU and under the interpreter alike).

Each program owns a tile of BLOCKS whole blocks, BLOCKS x ELEMS outputs (a power of two; the tail tile is masked).
Every output element finds its bytes by index arithmetic on its position e in the block, so a program's loads are
gathers from the BLOCKS x BYTES bytes it owns; the scale bytes are read once per element and served by the cache.
f16 fields are decoded in-kernel: the two little-endian bytes are joined into a 16-bit integer and bitcast to
fp16, then widened to fp32 (exact, subnormals included).
Rounding: every product in the spec is exact in fp32 (see reference_gguf), so contracting d * q + m into an FMA
could not change a bit anyway; the launcher still passes enable_fp_fusion=False so the compiled kernel does the
spec's operations one by one. Bit-exactness is what the tests check, under TRITON_INTERPRET=1.
Traffic: reads the packed bytes (4.25 to 8.5 bits per weight), writes ELEMS outputs per block: store-bound.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from llama_erc.kernels._utils import cast_rne, check_same_device, num_warps_for, rows_per_tile
from llama_erc.kernels.reference_gguf import GGUF_BLOCKS, as_gguf_blocks


@triton.jit
def _load_f16(src, OFFSET: tl.constexpr, ok):
    """The little-endian f16 at byte OFFSET of each block (src: (BLOCKS, 1) block starts) -> (BLOCKS, 1) fp32."""
    lo = tl.load(src + OFFSET, mask=ok, other=0).to(tl.uint16)
    hi = tl.load(src + OFFSET + 1, mask=ok, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _load_u8(src, offset, ok):
    """Bytes at offset (int32 tensor) inside each block, as int32 so shifts and masks do not wrap."""
    return tl.load(src + offset, mask=ok, other=0).to(tl.int32)


@triton.jit
def _tile(n_blocks, BLOCKS: tl.constexpr, ELEMS: tl.constexpr):
    """This program's blocks (BLOCKS, 1) int64, their mask, and the element index e (1, ELEMS) within a block."""
    blk = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)[:, None]  # int64: bytes may pass 2**31
    e = tl.arange(0, ELEMS)[None, :]
    return blk, blk < n_blocks, e


@triton.jit
def _store(y_ptr, blk, e, y, ok, ELEMS: tl.constexpr):
    """One rounding of the fp32 values into the output dtype; y_ptr is (n_blocks, ELEMS) contiguous."""
    tl.store(y_ptr + blk * ELEMS + e, cast_rne(y, y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _k_scale_min(src, sub, ok):
    """The 6-bit scale and min of sub-block `sub` (1, 256) of each Q4_K / Q5_K block; scales at bytes 4..15."""
    j = sub % 4
    s = _load_u8(src, 4 + j, ok)  # scale bytes 0..3: sc[j] (low 6 bits), top 2 bits of sc[j + 4]
    m = _load_u8(src, 8 + j, ok)  # scale bytes 4..7: mn[j] (low 6 bits), top 2 bits of mn[j + 4]
    t = _load_u8(src, 12 + j, ok)  # scale bytes 8..11: low 4 bits of sc[j + 4] | of mn[j + 4] << 4
    first = sub < 4
    sc = tl.where(first, s & 63, (t & 15) | ((s >> 6) << 4))
    mn = tl.where(first, m & 63, (t >> 4) | ((m >> 6) << 4))
    return sc.to(tl.float32), mn.to(tl.float32)


@triton.jit
def _dequant_q8_0_kernel(
    q_ptr, y_ptr,  # (n_blocks, BYTES) uint8 raw blocks, (n_blocks, ELEMS) out dtype; both contiguous
    n_blocks,
    BLOCKS: tl.constexpr,  # blocks per program, a power of two
    BYTES: tl.constexpr, ELEMS: tl.constexpr,  # the type's block size in bytes and in elements (GGUF_BLOCKS)
):
    blk, ok, e = _tile(n_blocks, BLOCKS, ELEMS)
    src = q_ptr + blk * BYTES  # (BLOCKS, 1) first byte of each block
    d = _load_f16(src, 0, ok)
    q = tl.load(src + 2 + e, mask=ok, other=0).to(tl.int8, bitcast=True).to(tl.float32)
    _store(y_ptr, blk, e, q * d, ok, ELEMS)


@triton.jit
def _dequant_q4_kernel(q_ptr, y_ptr, n_blocks,  # as _dequant_q8_0_kernel
                       BLOCKS: tl.constexpr, BYTES: tl.constexpr, ELEMS: tl.constexpr,
                       HAS_MIN: tl.constexpr):  # Q4_1: an f16 min m after d, added; Q4_0: codes centred on 8
    blk, ok, e = _tile(n_blocks, BLOCKS, ELEMS)
    src = q_ptr + blk * BYTES
    d = _load_f16(src, 0, ok)
    qs = 4 if HAS_MIN else 2  # where the nibbles start
    q = (_load_u8(src, qs + e % 16, ok) >> ((e // 16) * 4)) & 15  # low nibbles, then high nibbles
    if HAS_MIN:
        y = d * q.to(tl.float32) + _load_f16(src, 2, ok)
    else:
        y = d * (q - 8).to(tl.float32)
    _store(y_ptr, blk, e, y, ok, ELEMS)


@triton.jit
def _dequant_k_kernel(q_ptr, y_ptr, n_blocks,  # as _dequant_q8_0_kernel
                      BLOCKS: tl.constexpr, BYTES: tl.constexpr, ELEMS: tl.constexpr,
                      FIVE_BIT: tl.constexpr):  # Q5_K: 32 qh bytes (the codes' fifth bit) before the nibbles
    blk, ok, e = _tile(n_blocks, BLOCKS, ELEMS)
    src = q_ptr + blk * BYTES
    d = _load_f16(src, 0, ok)
    dmin = _load_f16(src, 2, ok)
    sub = e // 32  # (1, 256) sub-block: pairs of sub-blocks share 32 qs bytes (low, then high nibbles)
    sc, mn = _k_scale_min(src, sub, ok)
    qs = 48 if FIVE_BIT else 16  # where the nibbles start
    q = (_load_u8(src, qs + (sub // 2) * 32 + e % 32, ok) >> ((sub % 2) * 4)) & 15
    if FIVE_BIT:
        q = q | (((_load_u8(src, 16 + e % 32, ok) >> sub) & 1) << 4)  # bit `sub` of qh byte e % 32
    _store(y_ptr, blk, e, (d * sc) * q.to(tl.float32) - dmin * mn, ok, ELEMS)


@triton.jit
def _dequant_q6_k_kernel(q_ptr, y_ptr, n_blocks,  # as _dequant_q8_0_kernel
                         BLOCKS: tl.constexpr, BYTES: tl.constexpr, ELEMS: tl.constexpr):
    blk, ok, e = _tile(n_blocks, BLOCKS, ELEMS)
    src = q_ptr + blk * BYTES
    half, r = e // 128, e % 128  # two halves of 128 elements: 64 ql bytes and 32 qh bytes each
    q_lo = (_load_u8(src, half * 64 + r % 64, ok) >> ((r // 64) * 4)) & 15
    q_hi = (_load_u8(src, 128 + half * 32 + r % 32, ok) >> ((r // 32) * 2)) & 3
    q = (q_lo | (q_hi << 4)) - 32  # [-32, 31]
    scale = tl.load(src + 192 + e // 16, mask=ok, other=0).to(tl.int8, bitcast=True).to(tl.float32)
    d = _load_f16(src, 208, ok)
    _store(y_ptr, blk, e, (d * scale) * q.to(tl.float32), ok, ELEMS)


# type -> (kernel, its constexprs beyond the block sizes); Q4_0/Q4_1 and Q4_K/Q5_K share a kernel each, their
# layouts differing only in one field (the min; the fifth bit)
KERNELS = {"Q8_0": (_dequant_q8_0_kernel, {}), "Q4_0": (_dequant_q4_kernel, {"HAS_MIN": False}),
           "Q4_1": (_dequant_q4_kernel, {"HAS_MIN": True}),
           "Q4_K": (_dequant_k_kernel, {"FIVE_BIT": False}), "Q5_K": (_dequant_k_kernel, {"FIVE_BIT": True}),
           "Q6_K": (_dequant_q6_k_kernel, {})}


def dequant_gguf(data: Tensor, ggml_type: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
    """data: uint8 raw blocks of ggml_type (any shape) -> the weight of `shape` (row-major) in dtype.

    Same function and errors as reference_gguf.dequantize_gguf; data must be on CUDA (or CPU under the
    interpreter)."""
    blocks = as_gguf_blocks(data, ggml_type, shape, dtype)  # (n_blocks, BYTES) uint8, checked
    kernel, constexprs = KERNELS[ggml_type]
    check_same_device(kernel, data=blocks)
    n_blocks = blocks.shape[0]
    ELEMS, BYTES = GGUF_BLOCKS[ggml_type]
    y = torch.empty((n_blocks, ELEMS), dtype=dtype, device=data.device)
    if n_blocks > 0:
        BLOCKS = rows_per_tile(ELEMS, n_blocks)  # whole blocks up to a TILE_ELEMS tile (power of two)
        kernel[(triton.cdiv(n_blocks, BLOCKS),)](
            blocks, y, n_blocks, BLOCKS=BLOCKS, BYTES=BYTES, ELEMS=ELEMS, **constexprs,
            num_warps=num_warps_for(BLOCKS * ELEMS), enable_fp_fusion=False)  # no FMA: the spec's op order
    return y.view(tuple(shape))
