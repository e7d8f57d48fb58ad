"""GGUF Q8_0 quantization: the pure-torch quantize_q8_0 vs gguf.quants.quantize byte for byte (random blocks at
scales from fp32-tiny to past fp16's max, an all-zero block, exact and near .5 ties, fp32 / bf16 / fp16 inputs),
its round trip through dequantize_gguf, the blocks gguf leaves undefined, and the input errors."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")  # an optional extra: the reference implementation of the layout

from gguf.quants import dequantize as gguf_dequantize  # noqa: E402
from gguf.quants import quantize as gguf_quantize  # noqa: E402

from llama_erc.kernels.reference_gguf import dequantize_gguf, quantize_q8_0  # noqa: E402

Q8_0 = gguf.GGMLQuantizationType.Q8_0
IN_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# log10 of the per-block scale of the random normals, per input dtype (a block's absmax is ~2.5 times its scale,
# under 5 times here): fp32 / bf16 span fp16-flushed and fp16-subnormal stored scales (absmax < 127 * 2^-25 ~ 3.8e-6
# and < 127 * 2^-14 ~ 7.8e-3) down to fp32-tiny blocks, and up to absmax ~5e6, below the ~8.3e6 where the stored
# scale overflows fp16; fp16 inputs stay inside fp16's own range (subnormal values included).
LOG10_SCALE = {torch.float32: (-30.0, 6.0), torch.bfloat16: (-30.0, 6.0), torch.float16: (-6.0, 3.8)}


def gguf_bytes(w: torch.Tensor) -> torch.Tensor:
    """gguf's Q8_0 bytes of w (its fp32 value, row-major) as (n_blocks, 34) uint8."""
    raw = gguf_quantize(w.float().cpu().numpy().reshape(-1, 32), Q8_0)  # (n_blocks, 34)
    return torch.from_numpy(raw)


def assert_bytes_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == torch.uint8 and got.shape == want.shape, (got.dtype, got.shape, want.shape)
    bad = (got != want).any(dim=1).nonzero().reshape(-1)
    assert bad.numel() == 0, f"{bad.numel()} blocks differ, first {bad[0].item()}: " \
                             f"{got[bad[0]].tolist()} vs {want[bad[0]].tolist()}"


def ties_block(d: float) -> list[float]:
    """32 values whose x / d lands on exact .5 ties (both signs, even and odd floors) and just beside them; its
    absmax is 127 d, so the fp32 scale is d. d must be a power of two for x / d to be exact."""
    def f32_next(v: float, toward: float) -> float:  # the fp32 neighbour of v (math.nextafter's is fp64's)
        return torch.nextafter(torch.tensor(v), torch.tensor(toward)).item()

    below, above, below_2_5 = f32_next(0.5, 0.0), f32_next(0.5, 1.0), f32_next(2.5, 0.0)
    q = [127.0, 0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 126.5, -126.5, below, -below, above, -above,
         below_2_5, -below_2_5, 3.5, 64.5, -64.5, 0.0, -0.0]
    q += [k + 0.5 for k in range(4, 16)]  # 12 more ties, to fill the block
    return [v * d for v in q]


def make_weight(dtype: torch.dtype, rows: int, seed: int) -> torch.Tensor:
    """(rows, 256) in dtype: 8 blocks a row of standard normals, each block its own log-uniform scale, with
    blocks 1..5 replaced: all zeros, two blocks of ties, fp32-subnormal elements beside a normal absmax, and the
    edge of range (a stored scale just under fp16's max for fp32 / bf16, fp16's max as the absmax for fp16)."""
    gen = torch.Generator().manual_seed(seed)
    lo, hi = LOG10_SCALE[dtype]
    scale = 10.0 ** (lo + (hi - lo) * torch.rand(rows * 8, 1, generator=gen, dtype=torch.float64))
    x = (torch.randn(rows * 8, 32, generator=gen, dtype=torch.float64) * scale).float()  # (rows * 8, 32)
    x[1] = 0.0
    x[2] = torch.tensor(ties_block(1.0))
    x[3] = torch.tensor(ties_block(2.0 ** -4))
    x[4] = torch.linspace(-1e-39, 1e-39, 32)  # fp32-subnormal elements; codes 0, and d from the 1.0 below
    x[4, 7] = 1.0
    if dtype == torch.float16:
        x[5] = torch.linspace(-65504.0, 65504.0, 32)  # fp16's max as the absmax: d = 515.8
    else:
        x[5] = torch.linspace(-8.3e6, 8.3e6, 32)  # d = 65354.3 rounds to fp16 65344, just under its max
    return x.reshape(rows, 256).to(dtype)


@pytest.mark.parametrize("dtype", IN_DTYPES, ids=["fp32", "bf16", "fp16"])
def test_quantize_q8_0_matches_gguf(dtype, device):
    w = make_weight(dtype, rows=64, seed=7)
    got = quantize_q8_0(w.to(device))
    assert got.device.type == torch.device(device).type
    assert_bytes_equal(got.cpu(), gguf_bytes(w))


def test_quantize_q8_0_scale_rounding_and_ties():
    d = torch.tensor(1.0 / 24.0).item()  # an fp32 scale that fp16 holds only 2.4e-4 low (1/3 is 0.33325 in fp16)
    x = torch.tensor([ties_block(1.0), ties_block(2.0 ** -20), [d * 127, d * 126.49] + [d * k for k in range(30)]])
    got = quantize_q8_0(x)  # (3, 34)
    assert_bytes_equal(got, gguf_bytes(x))
    codes = got[:, 2:].contiguous().view(torch.int8)  # (3, 32)
    want = [127, 1, -1, 2, -2, 3, -3, 127, -127, 0, 0, 1, -1, 2, -2, 4, 65, -65, 0, 0] + list(range(5, 17))
    assert codes[0].tolist() == want and codes[1].tolist() == want  # ties away from zero; 0.49999997 stays 0
    d16 = got[:, 0:2].contiguous().view(torch.float16).float().reshape(-1)  # (3,) the stored scales
    assert d16.tolist() == [1.0, 2.0 ** -20, torch.tensor(d).half().item()]  # 2^-20: an fp16 subnormal
    # the codes come from the fp32 scale: 126.49 d -> 126, where the fp16 scale would give 126.52 -> 127
    assert codes[2].tolist() == [127, 126] + list(range(30))
    assert torch.round(x[2, 1] / d16[2]).item() == 127


def test_quantize_q8_0_round_trip(device):
    w = make_weight(torch.float32, rows=16, seed=3).reshape(4, 4, 256)
    raw = quantize_q8_0(w.to(device))
    got = dequantize_gguf(raw, "Q8_0", tuple(w.shape)).cpu()  # (4, 4, 256) fp32
    want = torch.from_numpy(gguf_dequantize(gguf_bytes(w).numpy(), Q8_0)).reshape(w.shape)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))  # bit for bit, -0.0 included
    blocks, y = w.reshape(-1, 32), got.reshape(-1, 32)
    d16 = raw.cpu()[:, 0:2].contiguous().view(torch.float16).float()  # (n, 1) the stored scale
    normal = (d16 >= 2.0 ** -14).reshape(-1)  # fp16-normal scale: within half a code plus the rounding of d
    err = (y - blocks).abs()[normal].amax(dim=1) / blocks.abs()[normal].amax(dim=1)
    assert err.max() < 0.5 / 127 + 2.0 ** -10


def test_quantize_q8_0_shapes_and_layout():
    w = make_weight(torch.float32, rows=4, seed=1)  # (4, 256)
    want = quantize_q8_0(w)
    assert want.shape == (32, 34) and want.dtype == torch.uint8
    assert torch.equal(quantize_q8_0(w.reshape(2, 2, 8, 32)), want)  # any shape: row-major blocks
    assert torch.equal(quantize_q8_0(w.t().contiguous().t()), want)  # a non-contiguous view: its logical order
    assert torch.equal(quantize_q8_0(w.double()), want)  # fp64 rounds to the same fp32, as gguf's astype does
    assert quantize_q8_0(torch.empty(0, 64)).shape == (0, 34)


def test_quantize_q8_0_blocks_gguf_leaves_undefined():
    # absmax < ~3.7e-37: 1 / d overflows fp32; gguf's codes are NaN cast to int8 (0 on x86). Written as the
    # all-zero block, which dequantizes to the zeros the flushed fp16 d gives anyway.
    x = torch.tensor([[1e-37] + [-3e-38] * 31, [1e-40, -1e-45] + [0.0] * 30])
    raw = quantize_q8_0(x)
    assert torch.equal(raw, torch.zeros(2, 34, dtype=torch.uint8))
    assert torch.equal(dequantize_gguf(raw, "Q8_0", (64,)), torch.zeros(64))
    # just above that edge (d subnormal in fp32, 1 / d finite), gguf is defined and matched
    edge = torch.tensor([[1e-36, -1e-36 / 3] + [1e-37 * k for k in range(30)]])
    assert_bytes_equal(quantize_q8_0(edge), gguf_bytes(edge))


@pytest.mark.parametrize("bad, match", [
    (torch.zeros(33), "33 elements"),
    (torch.zeros(4, 10), r"shape \(4, 10\) has 40 elements"),
    (torch.zeros(32), None),  # the valid control, no error
    (torch.zeros(32, dtype=torch.int32), "torch.int32"),
    (torch.zeros(32, dtype=torch.uint8), "torch.uint8"),
    (np.zeros(32, dtype=np.float32), "ndarray"),
    (torch.tensor([0.0] * 5 + [float("nan")] + [0.0] * 26), "nan at flat index 5"),
    (torch.tensor([0.0] * 40 + [float("-inf")] + [0.0] * 23, dtype=torch.bfloat16), "-inf at flat index 40"),
    (torch.tensor([1.0] * 32 + [1e7] + [0.0] * 31), r"block 1 \(w flat elements 32\.\.63\) has absmax 1000000"),
])
def test_quantize_q8_0_errors(bad, match):
    if match is None:
        quantize_q8_0(bad)
        return
    with pytest.raises(ValueError, match=match):
        quantize_q8_0(bad)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
def test_quantize_q8_0_refuses_what_gguf_stores_as_inf():
    # why a block past fp16's scale range is an error: gguf writes d = inf, which dequantizes to inf and NaN
    x = torch.linspace(-1e7, 1e7, 32)
    assert math.isinf(gguf_bytes(x)[0, 0:2].view(torch.float16).item())
    with pytest.raises(ValueError, match="overflows fp16"):
        quantize_q8_0(x)
