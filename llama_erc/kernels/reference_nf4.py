"""Pure-torch NF4 (QLoRA 4-bit NormalFloat) in bitsandbytes' layout: the spec that dequant_nf4.py must match.

No triton import here. The layout is that of bitsandbytes' quantize_4bit(quant_type="nf4", blocksize=64,
compress_statistics=True), so `*-bnb-4bit` checkpoints can be read into an NF4Weight:

    n elements (w flattened row-major), n_blocks = ceil(n / 64), n_nested = ceil(n_blocks / 256)
    packed        uint8 (ceil(n / 2),)  two 4-bit codes a byte: element 2i in the HIGH nibble of byte i, element
                                        2i + 1 in the low nibble (an odd n pads the last low nibble with code 7)
    absmax_codes  uint8 (n_blocks,)     each block's absmax, minus offset, as an index into nested_code
    nested_absmax fp32  (n_nested,)     one scale per 256 blocks (absmax - offset is quantized blockwise again)
    nested_code   fp32  (256,)          bitsandbytes' signed 8-bit dynamic map, create_dynamic_map(signed=True)
    offset        float (an fp32 value) mean of the blocks' fp32 absmax (dequantization rounds it to fp32)
    shape         tuple                 the weight's shape
The 16 NF4 values (NF4_CODE) are fixed, stored in a checkpoint as `weight.quant_map`.
In a bitsandbytes state dict (Linear4bit._save_to_state_dict -> QuantState.as_dict(packed=True)) these are
`weight` (packed, stored as (ceil(n/2), 1) uint8), `weight.absmax` (absmax_codes), `weight.nested_absmax`,
`weight.nested_quant_map` (nested_code), `weight.quant_map` (NF4_CODE), and `weight.quant_state.bitsandbytes__nf4`,
the UTF-8 bytes of a JSON dict {"quant_type": "nf4", "blocksize": 64, "dtype", "shape", "nested_blocksize": 256,
"nested_dtype": "float32", "nested_offset": offset}.

Dequantization, all in fp32, one rounding per op, in this order (bitsandbytes' dequantize_4bit):
    a[b] = nested_code[absmax_codes[b]] * nested_absmax[b // 256] + offset      (product rounded, then the sum)
    y[e] = NF4_CODE[code[e]] * a[e // 64]                                      (rounded once to fp32)
then one rounding of y into the requested dtype (round to nearest even).
Quantization, in fp32 from w.float() (bitsandbytes' pure-torch backend, backends/default/ops.py):
    absmax[b] = max |w| over block b; x = w * (1 / max(absmax[b], 1e-38)), clamped to [-1, 1]
    code = nearest entry of the (sorted) code table: x is bucketed by the fp32 midpoints (c[k] + c[k+1]) / 2,
           and a value equal to a midpoint takes the LOWER code (torch.bucketize, right=False)
    offset = mean(absmax) (fp32, torch.mean); absmax - offset is quantized the same way with nested_code in
           blocks of 256, giving absmax_codes and nested_absmax.
Tails: n need not be a multiple of 64 (nor n_blocks of 256). As in bitsandbytes' torch path, the last, short
block has the absmax of its own elements, stored clamped to >= 1e-38, and is scaled by division (x = w / absmax)
instead of by the reciprocal; padding elements quantize to code 7 (0.0).
bitsandbytes' CUDA kernels (csrc/kernels.cu: kQuantizeBlockwise, dQuantizeNF4, dQuantize) use the same NF4
thresholds (its decision tree's constants are these fp32 midpoints, ties also going down) and the same dequant
math; they differ from this spec only where a value falls within an ulp or two of a midpoint (--use_fast_math
reciprocal; 8-bit ties go to the even index), or for an all-zero block (codes 0, i.e. -1.0, instead of 7).
Its CPU backend quantizes the nested absmax through a 65536-entry lookup table, which picks a neighbour of the
nearest code for values close to a midpoint (36 of 24576 blocks in our check); dequantization is the same math
on every backend. A bitsandbytes `weight` tensor of shape (ceil(n/2), 1) is read here as packed.view(-1).

Refs: bitsandbytes-foundation/bitsandbytes@95f9af309d4d5793847169c39288dcd3fcbdf564 (v0.50.2):
bitsandbytes/functional.py (quantize_4bit, dequantize_4bit, quantize_blockwise, create_dynamic_map,
get_4bit_type, QuantState.as_dict), bitsandbytes/backends/default/ops.py, csrc/kernels.cu.
Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", arXiv 2305.14314 (NF4, double quantization).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# The NF4 table: bitsandbytes functional.get_4bit_type("nf4") (= create_normal_map(offset=0.9677083), the normal
# quantiles of QLoRA section 3), fp32, sorted, code k is NF4_CODE[k].
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], dtype=torch.float32)
NF4_BLOCK = 64  # elements per absmax block (bitsandbytes' default blocksize for 4-bit)
NESTED_BLOCK = 256  # absmax values per nested block (quantize_4bit's compress_statistics blocksize)
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MIN_ABSMAX = 1e-38  # bitsandbytes' clamp: an all-zero block scales by 1e38 instead of dividing by zero


def dynamic_code_signed() -> Tensor:
    """(256,) fp32, sorted: bitsandbytes' create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8).

    Decade i = 0..6 holds 2**i linear fraction values, the midpoints of linspace(0.1, 1, 2**i + 1), times
    10**(i - 6), with both signs; plus 0 and 1.0. So 127 negative values down to -0.99297, 0 at index 127, and
    128 positive values up to 1.0. Computed with the same fp32 ops as bitsandbytes, so the bits agree.
    """
    parts = [torch.zeros(1), torch.ones(1)]
    for i in range(7):
        edges = torch.linspace(0.1, 1.0, 2 ** i + 1, dtype=torch.float32)  # (2**i + 1,)
        mids = (edges[:-1] + edges[1:]) / 2.0  # (2**i,)
        mag = (10.0 ** (i - 6)) * mids  # fp32 product, as bitsandbytes' `10 ** k * means`
        parts += [mag, -mag]
    return torch.cat(parts).sort().values


@dataclass(frozen=True, eq=False)  # eq=False: comparing tensors with == is not a bool
class NF4Weight:
    """An NF4-quantized weight in bitsandbytes' layout (see the module docstring for each field)."""
    packed: Tensor  # uint8 (ceil(n/2),)
    absmax_codes: Tensor  # uint8 (n_blocks,)
    nested_absmax: Tensor  # fp32 (ceil(n_blocks/256),)
    nested_code: Tensor  # fp32 (256,)
    offset: float
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def n_blocks(self) -> int:
        return -(-self.numel // NF4_BLOCK)


def _check_1d(name: str, t: object, dtype: torch.dtype, length: int) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"NF4Weight.{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype or t.shape != (length,):
        raise ValueError(f"NF4Weight.{name} must be {dtype} of shape ({length},), got {t.dtype} of shape "
                         f"{tuple(t.shape)}")


def check_nf4_weight(q: NF4Weight) -> None:
    """Raise ValueError naming the bad field if q is not a consistent NF4Weight."""
    if not isinstance(q, NF4Weight):
        raise ValueError(f"expected an NF4Weight, got {type(q).__name__}")
    if not isinstance(q.shape, tuple) or not all(isinstance(d, int) and d >= 0 for d in q.shape) or q.numel < 1:
        raise ValueError(f"NF4Weight.shape must be a tuple of non-negative ints with at least one element, "
                         f"got {q.shape!r}")
    n_blocks = q.n_blocks
    _check_1d("packed", q.packed, torch.uint8, -(-q.numel // 2))
    _check_1d("absmax_codes", q.absmax_codes, torch.uint8, n_blocks)
    _check_1d("nested_absmax", q.nested_absmax, torch.float32, -(-n_blocks // NESTED_BLOCK))
    _check_1d("nested_code", q.nested_code, torch.float32, 256)
    if not isinstance(q.offset, (int, float)) or not math.isfinite(q.offset):
        raise ValueError(f"NF4Weight.offset must be a finite float, got {q.offset!r}")
    devices = {t.device for t in (q.packed, q.absmax_codes, q.nested_absmax, q.nested_code)}
    if len(devices) != 1:
        raise ValueError(f"NF4Weight tensors must share one device, got {sorted(map(str, devices))}")


def check_out_dtype(dtype: torch.dtype) -> None:
    if dtype not in OUT_DTYPES:
        raise ValueError(f"dtype {dtype} is not supported; use torch.float32, torch.bfloat16 or torch.float16")


def _blocks_and_absmax(x: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """x (n,) fp32 -> x zero-padded to (n_blocks, block), absmax (n_blocks,); a short last block's absmax is
    stored clamped to >= 1e-38, as bitsandbytes' torch path does (zero padding never raises a max of |x|)."""
    n = x.numel()
    n_blocks = -(-n // block)
    blocks = torch.nn.functional.pad(x, (0, n_blocks * block - n)).view(n_blocks, block)  # (n_blocks, block)
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,)
    if n % block:
        absmax[-1] = absmax[-1].clamp(min=_MIN_ABSMAX)
    return blocks, absmax


def _nearest_code(blocks: Tensor, absmax: Tensor, code: Tensor, has_tail: bool) -> Tensor:
    """blocks (n_blocks, block) fp32 -> (n_blocks, block) int64 index of the nearest entry of sorted `code` to
    each value / absmax; a value on a midpoint takes the lower code."""
    inv = 1.0 / absmax.clamp(min=_MIN_ABSMAX)  # (n_blocks,) fp32 reciprocal, then a multiply: bnb's rounding
    scaled = blocks * inv[:, None]  # (n_blocks, block)
    if has_tail:  # bnb scales its short last block by division; the result can differ from w * (1/a) by an ulp
        scaled[-1] = blocks[-1] / absmax[-1]
    bounds = (code[:-1] + code[1:]) / 2  # (len(code) - 1,) fp32 midpoints
    return torch.bucketize(scaled.clamp(-1.0, 1.0), bounds)


def _pack_nibbles(codes: Tensor) -> Tensor:
    """codes (2m,) in [0, 16) -> (m,) uint8 with codes[2i] in the high nibble and codes[2i + 1] in the low."""
    pairs = codes.to(torch.uint8).view(-1, 2)  # (m, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def quantize_nf4(w: Tensor) -> NF4Weight:
    """w: any float tensor with at least one element (computed in fp32 from w.float()) -> NF4Weight of w.shape.

    Any element count: a short last block is handled as bitsandbytes does (module docstring)."""
    if not isinstance(w, Tensor):
        raise ValueError(f"quantize_nf4: w must be a torch.Tensor, got {type(w).__name__}")
    if not w.is_floating_point():
        raise ValueError(f"quantize_nf4: w has dtype {w.dtype}; a floating-point tensor is needed")
    if w.numel() == 0:
        raise ValueError(f"quantize_nf4: w of shape {tuple(w.shape)} has no elements")
    x = w.detach().reshape(-1).float()  # (n,)
    bad = ~torch.isfinite(x)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(f"quantize_nf4: w has {int(bad.sum())} non-finite values (flat index {i} is {x[i].item()})")
    n = x.numel()
    blocks, absmax = _blocks_and_absmax(x, NF4_BLOCK)  # (n_blocks, 64), (n_blocks,)
    codes = _nearest_code(blocks, absmax, NF4_CODE.to(x.device), n % NF4_BLOCK != 0)  # (n_blocks, 64)
    packed = _pack_nibbles(codes.view(-1)[: n + n % 2])  # (ceil(n/2),): an odd n keeps one pad code (7)

    offset = absmax.mean()  # fp32 scalar tensor
    centred = absmax - offset  # (n_blocks,)
    n_blocks = centred.numel()
    nested_code = dynamic_code_signed().to(x.device)
    nested_blocks, nested_absmax = _blocks_and_absmax(centred, NESTED_BLOCK)  # (n_nested, 256), (n_nested,)
    absmax_codes = _nearest_code(nested_blocks, nested_absmax, nested_code, n_blocks % NESTED_BLOCK != 0)
    return NF4Weight(packed=packed, absmax_codes=absmax_codes.view(-1)[:n_blocks].to(torch.uint8),
                     nested_absmax=nested_absmax, nested_code=nested_code, offset=offset.item(),
                     shape=tuple(w.shape))


def nf4_absmax(q: NF4Weight) -> Tensor:
    """The double-quantized absmax of each block, (n_blocks,) fp32: nested_code[c] * nested_absmax[b // 256] +
    offset, one fp32 rounding per op."""
    check_nf4_weight(q)
    nested = torch.arange(q.n_blocks, device=q.packed.device) // NESTED_BLOCK  # (n_blocks,)
    scale = q.nested_code[q.absmax_codes.long()] * q.nested_absmax[nested]  # (n_blocks,) fp32, rounded
    return scale + torch.tensor(q.offset, dtype=torch.float32, device=scale.device)  # then the sum, rounded


def unpack_nf4_codes(packed: Tensor, n: int) -> Tensor:
    """packed (m,) uint8 -> (n,) int64 codes: element 2i from the high nibble of byte i, 2i + 1 from the low."""
    pairs = torch.stack([packed >> 4, packed & 0xF], dim=1)  # (m, 2)
    return pairs.view(-1)[:n].long()  # (n,): drops the pad nibble of an odd n


def dequantize_nf4(q: NF4Weight, dtype: torch.dtype = torch.float32) -> Tensor:
    """NF4Weight -> tensor of q.shape in dtype (fp32, bf16 or fp16): fp32 math, one rounding into dtype at the end."""
    check_nf4_weight(q)
    check_out_dtype(dtype)
    n = q.numel
    absmax = nf4_absmax(q)  # (n_blocks,) fp32
    values = NF4_CODE.to(q.packed.device)[unpack_nf4_codes(q.packed, n)]  # (n,) fp32
    block = torch.arange(n, device=values.device) // NF4_BLOCK  # (n,)
    y = values * absmax[block]  # (n,) fp32, one rounding
    return y.to(dtype).view(q.shape)
