"""NF4 in bitsandbytes' layout: the pure-torch twin (reference_nf4) against bitsandbytes' tables, nibble order and
outputs (golden values), its quantize -> dequantize properties, and the Triton kernel against the twin bit for bit."""
from __future__ import annotations

import dataclasses
import hashlib

import pytest
import torch

from llama_erc.kernels import reference_nf4 as R
from llama_erc.kernels.dequant_nf4 import dequant_nf4

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]
DEQUANTIZERS = [R.dequantize_nf4, dequant_nf4]

# bitsandbytes functional.get_4bit_type("nf4") at 95f9af3 (v0.50.2), transcribed
BNB_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
           -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
           0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]

# Golden outputs of bitsandbytes 0.50.2 quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
# on its pure-torch backend (backends/default/ops.py; CPU, native library not loaded), for _lcg_weight inputs.
# (3, 101): 303 elements, an odd count and a short last block; one nested block that is also a tail.
GOLDEN_SMALL = dict(
    packed="afc0d19594376b187d09e82760c59b493da69254e5773127a15b3969b17a243786b4b5a9559486369663868564a5637765a96a1a"
           "7af44f21cdb547a236c7ab400675791f85da14a2c3eeb38a8a67ea7cd9d6cc6a29dd2628dbe87e6577485e49878887747cb4524c48"
           "155b9ad0cd6857bcdaad5b63c359d5413ba6cf5b85592ba09436ed91435bb4a454f3dd4a5a1d1188651bd7498ccae7",
    absmax_codes="092c2effe1", nested_absmax=["0x1.2baccc0000000p-1"], offset="0x1.b073340000000p-1",
    y_fp32_sha256="34e7c79351b8307f0da3e3c6bed7bb1c759d7632682350414d54199daff519ec")  # its dequantize_4bit
# (12, 1600): 300 blocks, so two nested blocks (the second a tail of 44); sha256 of the uint8 bytes
GOLDEN_LARGE = dict(
    packed_sha256="0675a1e1bc0c81d281b5de74d10e0f20af3cf10b903b6008dfc077172e4cd739",
    absmax_codes_sha256="d5af32bab5c5181209b3bb0c3754e84c5475e5188bf8a2e4ebc8f415d96a4236",
    nested_absmax=["0x1.565c4a0000000p+2", "0x1.a266d80000000p+0"], offset="0x1.e44ed80000000p+0")
BNB_DYNAMIC_SHA256 = "e732639a65f497b4ad684bb166a4467708255edd5207757de8b8f0c7e1fda89c"  # create_dynamic_map(), fp32


def _lcg_weight(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Platform-independent input: sums of 4 LCG draws (integers, roughly normal) / 4096, times 2**(r % 5 - 2) for
    row r; every value is exact in fp32, so only the quantizer's own fp32 ops can round."""
    n = shape[0] * shape[1]
    s, vals = seed, []
    for _ in range(n):
        acc = 0
        for _ in range(4):
            s = (1103515245 * s + 12345) % 2 ** 31
            acc += (s >> 16) % 4096
        vals.append(acc - 8192)
    scale = torch.tensor([2.0 ** (r % 5 - 2) for r in range(shape[0])]).view(-1, 1)  # (rows, 1)
    return torch.tensor(vals, dtype=torch.float32).view(shape) / 4096 * scale


def _randn(shape, device, seed, dtype=torch.float32) -> torch.Tensor:
    """Seeded normal weights with a different scale per row, so the blocks' absmax (and the nested codes) vary."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * (0.5 + 4 * torch.rand(shape[0], 1, generator=g))
    return w.to(device=device, dtype=dtype)


def _hex(t: torch.Tensor) -> str:
    return bytes(t.cpu().tolist()).hex()


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.cpu().contiguous().numpy().tobytes()).hexdigest()


def test_nf4_code_is_bitsandbytes_table():
    assert R.NF4_CODE.dtype == torch.float32 and R.NF4_CODE.shape == (16,)
    assert torch.equal(R.NF4_CODE, torch.tensor(BNB_NF4, dtype=torch.float32))
    assert bool((R.NF4_CODE[1:] > R.NF4_CODE[:-1]).all()) and R.NF4_CODE[7] == 0
    # QLoRA's construction (bnb create_normal_map(0.9677083)): 8 positive and 7 negative normal quantiles, / max
    p = torch.linspace(0.9677083, 0.5, 9, dtype=torch.float32).double()  # bnb builds these in fp32
    pos = torch.special.ndtri(p[:-1])  # (8,)
    neg = -torch.special.ndtri(torch.linspace(0.9677083, 0.5, 8, dtype=torch.float32).double()[:-1])  # (7,)
    table = torch.cat([pos, neg, torch.zeros(1, dtype=torch.float64)]).sort().values
    torch.testing.assert_close(R.NF4_CODE.double(), table / table.max(), rtol=0, atol=1e-6)


def test_dynamic_code_signed_matches_bitsandbytes():
    c = R.dynamic_code_signed()
    assert c.dtype == torch.float32 and c.shape == (256,)
    assert _sha(c) == BNB_DYNAMIC_SHA256  # every bit of bnb's create_dynamic_map(signed=True)
    assert bool((c[1:] > c[:-1]).all()) and c[0] >= -1 and c[255] == 1.0
    assert c[127] == 0 and int((c < 0).sum()) == 127 and int((c > 0).sum()) == 128
    exact = {0: -0.992968738079071, 1: -0.9789062738418579, 126: -5.500000384017767e-07,
             128: 5.500000384017767e-07, 129: 3.250000190746505e-06, 254: 0.992968738079071}
    for i, v in exact.items():
        assert c[i].item() == v, (i, c[i].item())
    for i in range(7):  # decade i: 2**i linear values strictly inside (0.1, 1) * 10**(i - 6), each sign
        lo, hi = 0.1 * 10.0 ** (i - 6), 10.0 ** (i - 6)
        assert int(((c > lo) & (c < hi)).sum()) == 2 ** i and int(((-c > lo) & (-c < hi)).sum()) == 2 ** i


def test_nf4_packs_high_nibble_first():
    codes = torch.arange(16).repeat(4)  # (64,): one block whose absmax is 1.0
    for order, expected in [(codes, "0123456789abcdef" * 4), (codes.flip(0), "fedcba9876543210" * 4)]:
        w = R.NF4_CODE[order]
        q = R.quantize_nf4(w)
        assert _hex(q.packed) == expected  # element 2i in the high nibble, as bnb's (q[::2] << 4) | q[1::2]
        # a single block: absmax - offset = 0, the code of 0.0 in the dynamic map
        assert q.offset == 1.0 and q.absmax_codes.tolist() == [127]
        assert torch.equal(R.dequantize_nf4(q), w)


def test_nf4_odd_count_pads_the_low_nibble_with_code_7():
    q = R.quantize_nf4(torch.tensor([1.0, -1.0, 0.5]))  # 0.5 is below the 12|13 midpoint 0.5017: code 12
    assert _hex(q.packed) == "f0c7" and q.shape == (3,)


@pytest.mark.parametrize("dequantize", DEQUANTIZERS, ids=["twin", "kernel"])
def test_nf4_hand_built_weight_unpacks_high_nibble_first(dequantize, device):
    q = R.NF4Weight(packed=torch.tensor([0xF0, 0x7E], dtype=torch.uint8, device=device),
                    absmax_codes=torch.tensor([127], dtype=torch.uint8, device=device),  # code value 0.0
                    nested_absmax=torch.ones(1, device=device),
                    nested_code=R.dynamic_code_signed().to(device), offset=2.0, shape=(2, 2))  # absmax 0 * 1 + 2
    expected = torch.tensor([[1.0, -1.0], [0.0, 0.7229568362236023]]) * 2
    assert torch.equal(dequantize(q).cpu(), expected)


@pytest.mark.parametrize("shape", [(3, 320), (3, 101), (2, 8256)], ids=["3x320", "3x101-tail", "258-blocks"])
def test_nf4_round_trip_takes_the_nearest_code(shape, device):
    w = _randn(shape, device, seed=shape[1])
    q = R.quantize_nf4(w)
    x = w.reshape(-1)
    n = x.numel()
    block = torch.arange(n, device=device) // R.NF4_BLOCK  # (n,)
    absmax = torch.zeros(q.n_blocks, device=device).scatter_reduce(0, block, x.abs(), "amax")  # (n_blocks,)
    code = R.NF4_CODE.to(device)
    nearest = ((x / absmax[block])[:, None] - code).abs().argmin(dim=1)  # (n,) independent nearest code
    assert torch.equal(R.unpack_nf4_codes(q.packed, n), nearest)
    # double quantization: each absmax within half the widest gap of the dynamic map times its nested scale
    absmax_dq = R.nf4_absmax(q)
    nested = q.nested_absmax[torch.arange(q.n_blocks, device=device) // R.NESTED_BLOCK]  # (n_blocks,)
    half_gap8 = ((q.nested_code[1:] - q.nested_code[:-1]) / 2).max()
    assert bool(((absmax_dq - absmax).abs() <= half_gap8 * nested * (1 + 1e-6)).all())
    y = R.dequantize_nf4(q).reshape(-1)
    assert torch.equal(y, code[nearest] * absmax_dq[block])
    half_gap4 = ((code[1:] - code[:-1]) / 2).max()  # 0.1519, between -1 and -0.696
    bound = half_gap4 * absmax[block] + (absmax_dq - absmax).abs()[block]  # |code| <= 1
    assert bool(((y - x).abs() <= bound * (1 + 1e-6)).all())


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_nf4_code_values_come_back(dtype, device):
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 16, (40, 64), generator=g)  # (n_blocks, 64)
    codes[torch.arange(40), torch.randint(0, 64, (40,), generator=g)] = 15  # every block's absmax is 1.0 * scale
    w = (R.NF4_CODE[codes] * 2.0).to(device=device, dtype=dtype)  # all absmax equal: offset 2.0, nested exact
    q = R.quantize_nf4(w)
    assert torch.equal(R.unpack_nf4_codes(q.packed, w.numel()).cpu(), codes.view(-1))
    assert torch.equal(R.dequantize_nf4(q, dtype), w)
    # scales that differ by block: the codes still come back; the absmax only to the nested quantization
    scale = 2.0 ** torch.randint(-3, 4, (40, 1), generator=g).float()  # (n_blocks, 1) powers of two: exact
    q = R.quantize_nf4((R.NF4_CODE[codes] * scale).to(device))
    assert torch.equal(R.unpack_nf4_codes(q.packed, codes.numel()).cpu(), codes.view(-1))
    torch.testing.assert_close(R.nf4_absmax(q).cpu(), scale.view(-1), rtol=0, atol=0.0071 * 8)


def test_nf4_golden_bitsandbytes_small():
    w = _lcg_weight((3, 101), seed=7)
    q = R.quantize_nf4(w)
    assert _hex(q.packed) == GOLDEN_SMALL["packed"]
    assert _hex(q.absmax_codes) == GOLDEN_SMALL["absmax_codes"]
    assert [v.hex() for v in q.nested_absmax.tolist()] == GOLDEN_SMALL["nested_absmax"]
    assert q.offset.hex() == GOLDEN_SMALL["offset"]
    assert _sha(R.dequantize_nf4(q)) == GOLDEN_SMALL["y_fp32_sha256"]


def test_nf4_golden_bitsandbytes_two_nested_blocks():
    q = R.quantize_nf4(_lcg_weight((12, 1600), seed=11))
    assert _sha(q.packed) == GOLDEN_LARGE["packed_sha256"]
    assert _sha(q.absmax_codes) == GOLDEN_LARGE["absmax_codes_sha256"]
    assert [v.hex() for v in q.nested_absmax.tolist()] == GOLDEN_LARGE["nested_absmax"]
    assert q.offset.hex() == GOLDEN_LARGE["offset"]


@pytest.mark.parametrize("shape", [(4, 64), (3, 320), (3, 101), (3, 8200)],
                         ids=["4x64", "3x320-tile-tail", "3x101-odd", "385-blocks"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_dequant_nf4_kernel_matches_twin(shape, dtype, device):
    # 3x8200: 385 blocks (the last 24 elements), two nested blocks, 12300 bytes = 6 full tiles and a tail
    q = R.quantize_nf4(_randn(shape, device, seed=len(shape) + shape[1]))
    y = dequant_nf4(q, dtype)
    y_ref = R.dequantize_nf4(q, dtype)
    assert y.dtype == dtype and y.shape == shape
    assert torch.equal(y, y_ref)
    assert torch.equal(y_ref, R.dequantize_nf4(q).to(dtype))  # the twin rounds once, at the end


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_dequant_nf4_kernel_matches_twin_on_any_state(dtype, device):
    # arbitrary bytes and codes, as a checkpoint may hold; an offset that is not an fp32 value is rounded to one
    g = torch.Generator().manual_seed(5)
    n = 5 * 4099  # odd: a pad nibble
    n_blocks = -(-n // 64)
    q = R.NF4Weight(packed=torch.randint(0, 256, ((n + 1) // 2,), generator=g, dtype=torch.uint8).to(device),
                    absmax_codes=torch.randint(0, 256, (n_blocks,), generator=g, dtype=torch.uint8).to(device),
                    nested_absmax=(torch.rand(2, generator=g) * 3).to(device),
                    nested_code=R.dynamic_code_signed().to(device), offset=0.1234567891, shape=(5, 4099))
    assert torch.equal(dequant_nf4(q, dtype), R.dequantize_nf4(q, dtype))


def _valid(device="cpu") -> R.NF4Weight:
    return R.quantize_nf4(_randn((2, 64), device, seed=0))


@pytest.mark.parametrize("dequantize", DEQUANTIZERS, ids=["twin", "kernel"])
def test_nf4_dequantize_errors_name_the_value(dequantize, device):
    q = _valid(device)
    bad = [(dict(packed=q.packed.to(torch.int8)), r"packed must be torch.uint8 .*got torch.int8"),
           (dict(packed=q.packed[:-1]), r"packed .*shape \(64,\), got .*\(63,\)"),
           (dict(absmax_codes=torch.zeros(3, dtype=torch.uint8, device=device)), r"absmax_codes .*\(3,\)"),
           (dict(nested_absmax=torch.ones(2, device=device)), r"nested_absmax .*\(2,\)"),
           (dict(nested_code=q.nested_code.double()), r"nested_code .*torch.float64"),
           (dict(offset=float("nan")), "offset .*nan"),
           (dict(shape=(2, -64)), r"shape .*\(2, -64\)"),
           (dict(shape=[2, 64]), r"shape .*\[2, 64\]"),
           (dict(shape=(2, 65)), r"packed .*\(65,\)")]
    for change, match in bad:
        with pytest.raises(ValueError, match=match):
            dequantize(dataclasses.replace(q, **change))
    with pytest.raises(ValueError, match="torch.float64"):
        dequantize(q, torch.float64)
    with pytest.raises(ValueError, match="dict"):
        dequantize({"packed": q.packed})
    with pytest.raises(ValueError, match="one device"):
        dequantize(dataclasses.replace(q, nested_code=q.nested_code.to("meta")))


def test_dequant_nf4_kernel_rejects_a_device_it_cannot_run_on():
    q = _valid()
    meta = R.NF4Weight(*(t.to("meta") for t in (q.packed, q.absmax_codes, q.nested_absmax, q.nested_code)),
                       offset=q.offset, shape=q.shape)
    with pytest.raises(ValueError, match="meta"):
        dequant_nf4(meta)


def test_quantize_nf4_errors_name_the_value():
    with pytest.raises(ValueError, match="torch.int64"):
        R.quantize_nf4(torch.ones(64, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(0, 64\)"):
        R.quantize_nf4(torch.ones(0, 64))
    with pytest.raises(ValueError, match="list"):
        R.quantize_nf4([1.0] * 64)
    for value in ["nan", "inf"]:
        w = torch.ones(2, 64)
        w[1, 3] = float(value)
        with pytest.raises(ValueError, match=f"1 non-finite .*index 67 is {value}"):
            R.quantize_nf4(w)
