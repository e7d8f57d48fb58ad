"""Pure-torch dequantization of GGUF quantized blocks: the spec the kernels of dequant_gguf.py must match; and
the Q8_0 quantizer, gguf-py's bytes from torch (Quantization, below).

No triton import here. Each type is llama.cpp's own block layout, the raw bytes as a GGUF file stores them; every
multi-byte field is little-endian, `f16` is an IEEE half decoded exactly to fp32 (subnormals included), and a
block's output is its elements in the order listed (element e of block b is flat index b * ELEMS + e).
Names below: b[i] is byte i of the block, lo(x) = x & 0xF, hi(x) = x >> 4.

    Q8_0  32 elements, 34 B:  d f16 | qs 32 x int8
          y[e] = qs[e] * d
    Q4_0  32 elements, 18 B:  d f16 | qs 16 B
          q[e] = lo(qs[e]) for e < 16, hi(qs[e - 16]) for e >= 16;  y[e] = d * (q[e] - 8)
    Q4_1  32 elements, 20 B:  d f16 | m f16 | qs 16 B (nibbles as Q4_0)
          y[e] = d * q[e] + m
    Q4_K  256 elements, 144 B: d f16 | dmin f16 | scales 12 B | qs 128 B.  8 sub-blocks j of 32 elements, each
          with a 6-bit scale sc[j] and min mn[j] packed in the 12 scale bytes s[0..11]:
            j < 4:  sc[j] = s[j] & 63                      mn[j] = s[j + 4] & 63
            j >= 4: sc[j] = lo(s[j + 4]) | (s[j - 4] >> 6) << 4    mn[j] = hi(s[j + 4]) | (s[j] >> 6) << 4
          element e = 32 j + i, with qs byte 32 (j // 2) + i: q = lo(byte) if j is even, hi(byte) if odd
          y[e] = (d * sc[j]) * q - dmin * mn[j]
    Q5_K  256 elements, 176 B: d f16 | dmin f16 | scales 12 B | qh 32 B | qs 128 B.  As Q4_K, with a fifth bit:
          q = q4 | ((qh[i] >> j) & 1) << 4   (bit j of qh byte i, for e = 32 j + i)
          y[e] = (d * sc[j]) * q - dmin * mn[j]
    Q6_K  256 elements, 210 B: ql 128 B | qh 64 B | scales 16 x int8 | d f16.  Two halves h of 128 elements;
          element e = 128 h + r:
            low 4 bits  from ql byte 64 h + r % 64,  lo() if r < 64 else hi()
            high 2 bits from qh byte 32 h + r % 32,  bits 2 (r // 32) and 2 (r // 32) + 1
          q = (low | high << 4) - 32 (in [-32, 31]);  y[e] = (d * scales[e // 16]) * q

Math and cast points (those of gguf.quants, numpy, so results are bit-identical to it): the f16 fields become
fp32 first; the integer codes become fp32 (exactly); every product, sum and difference is one fp32 op, rounded,
in the association shown (the scale products first). Every product above is in fact exact in fp32 (an 11-bit
significand times at most 6 + 6 bits of integer), so only the final +/- of Q4_1, Q4_K and Q5_K rounds, and a
fused multiply-add would give the same bits. dequantize_gguf rounds into the requested dtype once, at the end.

Quantization (quantize_q8_0, the inverse for Q8_0; bit-identical to gguf.quants.quantize): all in fp32 from
w.float(), per block of 32 consecutive row-major elements x:
    d = absmax(x) / 127              one fp32 division, rounded
    q[e] = roundf(x[e] * (1 / d))    fp32 reciprocal, rounded; fp32 product, rounded; then ties away from zero
    stored: fp16(d) (round to nearest even, once, after the codes are taken from the fp32 d) | q as int8
so the codes see the unrounded fp32 scale, and the stored d may differ from it by half an fp16 ulp (or flush to
0 below ~2^-25, where the codes still span +/-127). An all-zero block has d = 0 and codes 0 (1 / d is taken as 0).
A block so tiny (absmax < ~3.7e-37) that 1 / d overflows fp32 is written the same way, as gguf's bytes on x86
(its NaN-to-int8 cast there gives 0); fp16(d) is 0 for it regardless. Refused with ValueError, as having no
faithful Q8_0 bytes: non-finite values (gguf's codes would be NaN cast to int8, undefined), and a block whose
fp16(d) overflows (absmax >= ~127 * 65520 = 8.3e6: gguf stores d = inf, which dequantizes to inf and NaN).
Ref: llama.cpp ggml/src/ggml-quants.c (dequantize_row_*, quantize_row_q8_0_ref); gguf-py gguf/quants.py.
"""
from __future__ import annotations

import math
import operator
from collections.abc import Callable

import torch
from torch import Tensor

QK_K = 256  # elements in a K-quant super-block
GGUF_BLOCKS: dict[str, tuple[int, int]] = {  # type -> (elements per block, bytes per block)
    "Q8_0": (32, 2 + 32),
    "Q4_0": (32, 2 + 16),
    "Q4_1": (32, 2 + 2 + 16),
    "Q4_K": (QK_K, 2 + 2 + 12 + QK_K // 2),
    "Q5_K": (QK_K, 2 + 2 + 12 + QK_K // 8 + QK_K // 2),
    "Q6_K": (QK_K, QK_K // 2 + QK_K // 4 + QK_K // 16 + 2),
}
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
Q8_0_QMAX = 127  # the largest Q8_0 code magnitude: d = absmax / 127 maps absmax to +/-127


def _f16(field: Tensor) -> Tensor:
    """(n, 2) uint8, a little-endian half per row -> (n, 1) fp32, exact. Assumes a little-endian host (x86, ARM,
    CUDA), where torch's view is the file's byte order."""
    return field.contiguous().view(torch.float16).float()


def _nibbles(qs: Tensor, run: int) -> Tensor:
    """(n, k * run) uint8 -> (n, 2 k * run): per run of `run` bytes, its low nibbles, then its high nibbles."""
    q = qs.reshape(qs.shape[0], -1, 1, run)  # (n, k, 1, run)
    return torch.cat((q & 0xF, q >> 4), dim=2).reshape(qs.shape[0], -1)  # (n, k, 2, run) -> (n, 2 k run)


def _bits(q: Tensor, run: int, width: int) -> Tensor:
    """(n, k * run) uint8 -> (n, k * (8 / width) * run): per run of bytes, the width-bit fields from the lowest."""
    shifts = torch.arange(0, 8, width, dtype=torch.uint8, device=q.device).reshape(1, 1, -1, 1)
    fields = q.reshape(q.shape[0], -1, 1, run) >> shifts  # (n, k, 8 / width, run)
    return (fields & ((1 << width) - 1)).reshape(q.shape[0], -1)


def _k_scale_min(s: Tensor) -> tuple[Tensor, Tensor]:
    """(n, 12) uint8 packed K-quant scales -> sc, mn: (n, 8) uint8, the 6-bit scale and min of each sub-block."""
    s_lo, m_lo, tail = s[:, 0:4], s[:, 4:8], s[:, 8:12]  # the top 2 bits of s_lo / m_lo belong to sub-blocks 4..7
    sc = torch.cat((s_lo & 0x3F, (tail & 0x0F) | ((s_lo >> 2) & 0x30)), dim=1)  # (n, 8)
    mn = torch.cat((m_lo & 0x3F, (tail >> 4) | ((m_lo >> 2) & 0x30)), dim=1)  # (n, 8)
    return sc, mn


def dequant_q8_0(blocks: Tensor) -> Tensor:
    """(n, 34) uint8 -> (n, 32) fp32."""
    d = _f16(blocks[:, 0:2])  # (n, 1)
    qs = blocks[:, 2:].contiguous().view(torch.int8).float()  # (n, 32)
    return qs * d


def dequant_q4_0(blocks: Tensor) -> Tensor:
    """(n, 18) uint8 -> (n, 32) fp32."""
    d = _f16(blocks[:, 0:2])  # (n, 1)
    q = _nibbles(blocks[:, 2:], 16).to(torch.int8) - 8  # (n, 32) in [-8, 7]
    return d * q.float()


def dequant_q4_1(blocks: Tensor) -> Tensor:
    """(n, 20) uint8 -> (n, 32) fp32."""
    d, m = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])  # (n, 1) each
    q = _nibbles(blocks[:, 4:], 16).float()  # (n, 32) in [0, 15]
    # m + d * q in one pass: on CPU the two broadcast ops over (n, 32) cost 3x more (measured); the product is
    # exact, so addcmul's one rounding gives the same bits
    return torch.addcmul(m, d, q)


def _k_quant(blocks: Tensor, q: Tensor) -> Tensor:
    """Shared tail of Q4_K and Q5_K: blocks (n, bytes) for d, dmin and scales; q (n, 256) codes -> (n, 256)."""
    n = blocks.shape[0]
    d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])  # (n, 1) each
    sc, mn = _k_scale_min(blocks[:, 4:16])
    d_sub = (d * sc.float()).reshape(n, 8, 1)  # per sub-block scale, then min: both exact in fp32
    m_sub = (dmin * mn.float()).reshape(n, 8, 1)
    return (d_sub * q.float().reshape(n, 8, 32) - m_sub).reshape(n, QK_K)


def dequant_q4_k(blocks: Tensor) -> Tensor:
    """(n, 144) uint8 -> (n, 256) fp32."""
    return _k_quant(blocks, _nibbles(blocks[:, 16:], 32))  # (n, 256) codes in [0, 15]


def dequant_q5_k(blocks: Tensor) -> Tensor:
    """(n, 176) uint8 -> (n, 256) fp32."""
    q_hi = _bits(blocks[:, 16:48], 32, 1)  # (n, 256): sub-block j takes bit j of the 32 qh bytes
    q_lo = _nibbles(blocks[:, 48:], 32)  # (n, 256)
    return _k_quant(blocks, q_lo | (q_hi << 4))  # codes in [0, 31]


def dequant_q6_k(blocks: Tensor) -> Tensor:
    """(n, 210) uint8 -> (n, 256) fp32."""
    n = blocks.shape[0]
    q_lo = _nibbles(blocks[:, 0:128], 64)  # (n, 256)
    q_hi = _bits(blocks[:, 128:192], 32, 2)  # (n, 256)
    q = (q_lo | (q_hi << 4)).to(torch.int8) - 32  # (n, 256) in [-32, 31]
    scales = blocks[:, 192:208].contiguous().view(torch.int8).float()  # (n, 16), one per 16 elements
    d = _f16(blocks[:, 208:210])  # (n, 1)
    d_sub = (d * scales).reshape(n, 16, 1)
    return (d_sub * q.float().reshape(n, 16, 16)).reshape(n, QK_K)


DEQUANT: dict[str, Callable[[Tensor], Tensor]] = {
    "Q8_0": dequant_q8_0, "Q4_0": dequant_q4_0, "Q4_1": dequant_q4_1,
    "Q4_K": dequant_q4_k, "Q5_K": dequant_q5_k, "Q6_K": dequant_q6_k,
}


def as_gguf_blocks(data: Tensor, ggml_type: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """Check the arguments of dequantize_gguf (ValueError naming the bad value) -> (n_blocks, bytes) uint8."""
    if ggml_type not in GGUF_BLOCKS:
        raise ValueError(f"unknown GGUF type {ggml_type!r}; supported: {', '.join(GGUF_BLOCKS)}")
    if not isinstance(data, Tensor) or data.dtype != torch.uint8:
        got = data.dtype if isinstance(data, Tensor) else type(data).__name__
        raise ValueError(f"data must be a uint8 tensor of raw {ggml_type} bytes, got {got}")
    if dtype not in OUT_DTYPES:
        raise ValueError(f"dtype {dtype} is not supported; use torch.float32, torch.bfloat16 or torch.float16")
    n_elems, n_bytes = GGUF_BLOCKS[ggml_type]
    if data.numel() % n_bytes:
        raise ValueError(f"{data.numel()} bytes is not a whole number of {ggml_type} blocks ({n_bytes} B each)")
    n_blocks = data.numel() // n_bytes
    try:
        shape = tuple(operator.index(s) for s in shape)  # accepts torch.Size and numpy integers
    except TypeError:
        raise ValueError(f"shape {shape!r} must be a tuple of integers") from None
    if any(s < 0 for s in shape) or math.prod(shape) != n_blocks * n_elems:
        raise ValueError(f"shape {shape} does not hold the {n_blocks} x {n_elems} = {n_blocks * n_elems} "
                         f"elements of {data.numel()} bytes of {ggml_type}")
    return data.reshape(-1).view(n_blocks, n_bytes)  # a copy only if data was not contiguous


def dequantize_gguf(data: Tensor, ggml_type: str, shape: tuple[int, ...],
                    dtype: torch.dtype = torch.float32) -> Tensor:
    """data: uint8 raw blocks of ggml_type (any shape) -> the weight of `shape` (row-major) in dtype.

    fp32 math throughout, rounded once into dtype; the fp32 result is bit-identical to gguf.quants.dequantize."""
    blocks = as_gguf_blocks(data, ggml_type, shape, dtype)
    return DEQUANT[ggml_type](blocks).reshape(tuple(shape)).to(dtype)


def _round_half_away(x: Tensor) -> Tensor:
    """fp32 -> the nearest integer as fp32, ties away from zero (C's roundf, gguf's np_roundf). Exact for finite x:
    |x| - floor(|x|) is exact in fp32, so the tie test sees the true fraction, where floor(|x| + 0.5) would not
    (0.49999997 + 0.5 rounds to 1.0 in fp32)."""
    a = x.abs()
    whole = a.floor()
    return (whole + (a - whole >= 0.5).to(x.dtype)).copysign(x)


def quantize_q8_0(w: Tensor) -> Tensor:
    """w: floating tensor of any shape, numel a multiple of 32 -> (numel / 32, 34) uint8 raw Q8_0 blocks of its
    row-major elements, on w's device: the bytes of gguf.quants.quantize(w.float().numpy(), Q8_0).

    fp32 math from w.float() (see the module docstring); ValueError naming the value on a non-tensor, a
    non-floating dtype, a numel that is not whole blocks, a non-finite value, or a block beyond fp16's scale."""
    if not isinstance(w, Tensor) or not w.is_floating_point():
        got = w.dtype if isinstance(w, Tensor) else type(w).__name__
        raise ValueError(f"w must be a floating-point tensor to quantize to Q8_0, got {got}")
    n_elems = GGUF_BLOCKS["Q8_0"][0]
    if w.numel() % n_elems:
        raise ValueError(f"w of shape {tuple(w.shape)} has {w.numel()} elements, not a whole number of Q8_0 "
                         f"blocks of {n_elems}")
    x = w.float().reshape(-1, n_elems)  # (n, 32) fp32; bf16 / fp16 widen exactly, fp64 rounds as numpy's astype
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        i = int((~finite).reshape(-1).nonzero()[0])
        raise ValueError(f"w holds the non-finite value {x.reshape(-1)[i].item()} at flat index {i}; "
                         f"Q8_0 cannot encode it")
    amax = x.abs().amax(dim=1, keepdim=True)  # (n, 1)
    # Tensor / tensor, both here and for 1 / d: CUDA turns a division by a python scalar into a multiply by its
    # rounded reciprocal, one bit off the true quotient gguf takes.
    d = amax / torch.full_like(amax, Q8_0_QMAX)  # (n, 1) fp32
    d16 = d.half()  # the stored scale, rounded once; the codes below still use the fp32 d
    over = torch.isinf(d16).reshape(-1)
    if bool(over.any()):
        b = int(over.nonzero()[0])
        raise ValueError(f"Q8_0 block {b} (w flat elements {b * n_elems}..{b * n_elems + n_elems - 1}) has absmax "
                         f"{amax[b, 0].item()}: its scale {d[b, 0].item()} overflows fp16 (max 65504)")
    inv = torch.ones_like(d) / d  # (n, 1); inf where d == 0 (all-zero block) or d < ~2^-128 (fp32 overflow)
    inv = torch.where(torch.isinf(inv), torch.zeros_like(inv), inv)  # gguf's 0 for d == 0; its x86 bytes beyond
    # |x * inv| <= 127 (1 + 2^-21) once inv is finite (d >= 2^-128 keeps 22 bits even when subnormal), so the
    # codes never reach the 127.5 that would round to 128, out of int8's range.
    q = _round_half_away(x * inv)  # (n, 32) integers in [-127, 127]
    return torch.cat((d16.view(torch.uint8), q.to(torch.int8).view(torch.uint8)), dim=1)  # (n, 2 + 32)
