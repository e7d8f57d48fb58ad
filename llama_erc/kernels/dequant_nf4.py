"""NF4 dequantization (bitsandbytes layout, double-quantized absmax) as a Triton kernel.

The spec is reference_nf4.dequantize_nf4; its docstring gives the layout. Per packed byte i (elements 2i, 2i+1,
both in block b = i // 32 since a 64-element block holds 32 whole bytes):
    a    = nested_code[absmax_codes[b]] * nested_absmax[b // 256] + offset     (fp32: product rounded, then sum)
    y[2i]     = NF4_CODE[byte >> 4]  * a                                      (the high nibble comes first)
    y[2i + 1] = NF4_CODE[byte & 0xF] * a
The absmax is dequantized in-kernel from its uint8 code (a gather from the 256-entry map, which stays in cache);
the two code tables are passed as fp32 tensors. Every product and the sum are single fp32 ops in the spec's
order, and the launcher passes enable_fp_fusion=False so the compiled kernel does not contract a * b + c into an
FMA (that would skip the product's rounding and change bits). The fp32 result is rounded once into the output
dtype (fp32, bf16 or fp16) through _utils.cast_rne: round to nearest even on the GPU and the interpreter alike.
Each program owns BLOCK_BYTES packed bytes (a power of two, masked tail, int64 offsets) and writes their
2 * BLOCK_BYTES outputs as one contiguous run (the two nibble halves interleaved back into element order).
Traffic: reads 0.5 B per weight + 1 B per 64 weights (the codes), writes 2 to 4 B per weight: store-bound.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from llama_erc.kernels._utils import TILE_ELEMS, cast_rne, check_same_device, num_warps_for
from llama_erc.kernels.reference_nf4 import (NESTED_BLOCK, NF4_BLOCK, NF4_CODE, NF4Weight, check_nf4_weight,
                                             check_out_dtype)

TILE_BYTES = TILE_ELEMS // 2  # packed bytes a program owns: 2 outputs each, a TILE_ELEMS output tile


@triton.jit
def _dequant_nf4_kernel(
    packed_ptr,  # (n_bytes,) uint8: element 2i in the high nibble of byte i, 2i + 1 in the low nibble
    absmax_code_ptr,  # (n_blocks,) uint8: index into nested_code of each block's absmax - offset
    nested_absmax_ptr,  # (ceil(n_blocks / NESTED_BLOCK),) fp32
    nested_code_ptr,  # (256,) fp32: the signed dynamic map
    nf4_ptr,  # (16,) fp32: NF4_CODE
    y_ptr,  # (n,) output dtype, contiguous
    n_bytes, n,  # n_bytes = ceil(n / 2); an odd n has a pad nibble that is not stored
    offset,  # fp32 mean of the absmax, added after the nested product
    BLOCK_BYTES: tl.constexpr,  # power of two
    NF4_BLOCK: tl.constexpr, NESTED_BLOCK: tl.constexpr,  # 64 and 256
):
    start = tl.program_id(0).to(tl.int64) * BLOCK_BYTES  # int64: n may pass 2**31
    i = start + tl.arange(0, BLOCK_BYTES)  # (BLOCK_BYTES,) byte indices
    ok = i < n_bytes
    byte = tl.load(packed_ptr + i, mask=ok, other=0).to(tl.int32)  # int32 so the shift cannot wrap
    blk = i // (NF4_BLOCK // 2)  # both elements of byte i lie in block (2i) // 64
    code = tl.load(absmax_code_ptr + blk, mask=ok, other=0).to(tl.int32)
    scale = tl.load(nested_code_ptr + code, mask=ok, other=0.0) * \
        tl.load(nested_absmax_ptr + blk // NESTED_BLOCK, mask=ok, other=0.0)
    absmax = scale + offset  # (BLOCK_BYTES,) fp32; no FMA (launcher), so the product is rounded first
    y_hi = tl.load(nf4_ptr + (byte >> 4), mask=ok, other=0.0) * absmax  # elements 2i
    y_lo = tl.load(nf4_ptr + (byte & 15), mask=ok, other=0.0) * absmax  # elements 2i + 1
    y = tl.interleave(y_hi, y_lo)  # (2 * BLOCK_BYTES,): y_hi[0], y_lo[0], y_hi[1], ... = element order
    e = 2 * start + tl.arange(0, 2 * BLOCK_BYTES)  # (2 * BLOCK_BYTES,) element indices
    tl.store(y_ptr + e, cast_rne(y, y_ptr.dtype.element_ty), mask=e < n)


def dequant_nf4(q: NF4Weight, dtype: torch.dtype = torch.float32) -> Tensor:
    """NF4Weight -> tensor of q.shape in dtype (fp32, bf16 or fp16); same function and errors as
    reference_nf4.dequantize_nf4. q's tensors must be on CUDA (or CPU under the interpreter)."""
    check_nf4_weight(q)
    check_out_dtype(dtype)
    device = check_same_device(_dequant_nf4_kernel, packed=q.packed, absmax_codes=q.absmax_codes,
                               nested_absmax=q.nested_absmax, nested_code=q.nested_code)
    n, n_bytes = q.numel, q.packed.numel()
    y = torch.empty(n, dtype=dtype, device=device)
    BLOCK_BYTES = min(TILE_BYTES, triton.next_power_of_2(n_bytes))
    _dequant_nf4_kernel[(triton.cdiv(n_bytes, BLOCK_BYTES),)](
        q.packed.contiguous(), q.absmax_codes.contiguous(), q.nested_absmax.contiguous(),
        q.nested_code.contiguous(), NF4_CODE.to(device), y, n_bytes, n, float(q.offset),
        BLOCK_BYTES=BLOCK_BYTES, NF4_BLOCK=NF4_BLOCK, NESTED_BLOCK=NESTED_BLOCK,
        num_warps=num_warps_for(2 * BLOCK_BYTES), enable_fp_fusion=False)  # no FMA: the spec's op order
    return y.view(q.shape)
