"""GGUF dequantization: the pure-torch twin vs gguf.quants bit for bit, the Triton kernels vs the twin bit for bit
(fp32, and the twin rounded once for bf16 / fp16), the real SmolLM2 file, and the input errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")  # an optional extra: the reference implementation of the layouts

from gguf.quants import dequantize as gguf_dequantize  # noqa: E402

from llama_erc.kernels._utils import TILE_ELEMS  # noqa: E402
from llama_erc.kernels.dequant_gguf import dequant_gguf  # noqa: E402
from llama_erc.kernels.reference_gguf import GGUF_BLOCKS, dequantize_gguf  # noqa: E402

TYPES = list(GGUF_BLOCKS)
F16_FIELDS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
OUT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DEQUANTS = {"twin": dequantize_gguf, "kernel": dequant_gguf}


def _f16_patterns(rng: np.random.Generator, n: int) -> np.ndarray:
    """n f16 bit patterns cycling through normal, subnormal, +0 and -0 (never inf / NaN), random signs."""
    sign = rng.integers(0, 2, n, dtype=np.uint16) << 15
    normal = (rng.integers(1, 31, n, dtype=np.uint16) << 10) | rng.integers(0, 1 << 10, n, dtype=np.uint16)
    subnormal = rng.integers(1, 1 << 10, n, dtype=np.uint16)
    kind = rng.permutation(np.arange(n) % 4)  # every kind present once n >= 4
    bits = np.select([kind == 0, kind == 1, kind == 2], [sign | normal, sign | subnormal, np.uint16(0)],
                     np.uint16(0x8000))
    return bits.astype(np.uint16)


def random_blocks(ggml_type: str, n_blocks: int, seed: int) -> np.ndarray:
    """(n_blocks, bytes) uint8: random quant bytes, f16 scale fields drawn by _f16_patterns."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (n_blocks, GGUF_BLOCKS[ggml_type][1]), dtype=np.uint8)
    for offset in F16_FIELDS[ggml_type]:
        blocks[:, offset:offset + 2] = _f16_patterns(rng, n_blocks).view(np.uint8).reshape(n_blocks, 2)
    return blocks


def assert_bits_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    """Same dtype, shape and bits (so -0.0 differs from +0.0)."""
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape, want.dtype, want.shape)
    int_type = {4: torch.int32, 2: torch.int16}[got.element_size()]
    bad = (got.view(int_type) != want.view(int_type)).nonzero()
    assert bad.numel() == 0, f"{bad.shape[0]} values differ, first at {bad[0].tolist()}: " \
                             f"{got[tuple(bad[0])].item()} vs {want[tuple(bad[0])].item()}"


@pytest.mark.parametrize("ggml_type", TYPES)
def test_dequant_gguf_twin_matches_gguf(ggml_type):
    n_bytes = GGUF_BLOCKS[ggml_type][1]
    raw = random_blocks(ggml_type, 64, seed=len(ggml_type) + n_bytes).reshape(8, 8 * n_bytes)  # 8 rows of 8 blocks
    want = gguf_dequantize(raw, gguf.GGMLQuantizationType[ggml_type])  # (8, 8 * n_elems) fp32
    got = dequantize_gguf(torch.from_numpy(raw), ggml_type, want.shape)
    assert_bits_equal(got, torch.from_numpy(want))


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # large f16 scales pass fp16's range: inf
@pytest.mark.parametrize("dtype", OUT_DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("ggml_type", TYPES)
def test_dequant_gguf_kernel_matches_twin(ggml_type, dtype, device):
    n_elems, n_bytes = GGUF_BLOCKS[ggml_type]
    tile = TILE_ELEMS // n_elems  # blocks per program at large counts
    for n_blocks in (3, tile + 3):  # one masked program; two programs, the second a masked tail
        raw = torch.from_numpy(random_blocks(ggml_type, n_blocks, seed=n_blocks + n_bytes))
        want = dequantize_gguf(raw, ggml_type, (n_blocks * n_elems,)).to(dtype)  # fp32, rounded once
        got = dequant_gguf(raw.reshape(-1).to(device), ggml_type, (n_blocks * n_elems,), dtype)
        assert_bits_equal(got.cpu(), want)


@pytest.mark.parametrize("name", list(DEQUANTS))
def test_dequant_gguf_any_data_shape_and_layout(name, device):
    raw = torch.from_numpy(random_blocks("Q4_K", 8, seed=1))  # (8, 144)
    want = dequantize_gguf(raw, "Q4_K", (8, 256))
    dequant = DEQUANTS[name]
    assert_bits_equal(dequant(raw.reshape(4, 288).to(device), "Q4_K", (4, 2, 256)).cpu(), want.view(4, 2, 256))
    wide = torch.cat((raw, raw), dim=1).to(device)  # (8, 288): every other block of a strided view
    assert_bits_equal(dequant(wide[:, :144], "Q4_K", torch.Size((2, 1024))).cpu(), want.view(2, 1024))
    empty = dequant(torch.empty(0, dtype=torch.uint8, device=device), "Q8_0", (0, 32), torch.bfloat16)
    assert empty.shape == (0, 32) and empty.dtype == torch.bfloat16


@pytest.mark.parametrize("name", list(DEQUANTS))
def test_dequant_gguf_literal_blocks(name, device):
    # the nibble order, the -8 offset and the f16 decode, independent of gguf
    q4_0 = torch.tensor([0x00, 0x3C] + [0x10 + i for i in range(16)], dtype=torch.uint8)  # d = 1.0 (f16 0x3C00)
    want = torch.tensor([i - 8 for i in range(16)] + [1 - 8] * 16, dtype=torch.float32)
    assert torch.equal(DEQUANTS[name](q4_0.to(device), "Q4_0", (32,)).cpu(), want)
    q8_0 = torch.tensor([0x00, 0xB8, *range(32)], dtype=torch.uint8)  # d = -0.5 (f16 0xB800)
    want = torch.arange(32, dtype=torch.float32) * -0.5
    assert torch.equal(DEQUANTS[name](q8_0.to(device), "Q8_0", (1, 32)).cpu(), want.view(1, 32))


@pytest.fixture(scope="module")
def smollm2_reader():
    from llama_erc.demo.pretrained import smollm2_gguf
    try:
        path = smollm2_gguf()
    except ValueError as e:
        pytest.skip(str(e))
    return gguf.GGUFReader(path)


def test_dequant_gguf_smollm2_file(smollm2_reader, device):
    seen = {}
    for t in smollm2_reader.tensors:  # the first tensor of each quantized type
        if t.tensor_type.name in GGUF_BLOCKS and t.tensor_type.name not in seen:
            seen[t.tensor_type.name] = t
    assert seen, "no quantized tensor of a supported type in the SmolLM2 file"
    for ggml_type, t in seen.items():
        raw = np.array(t.data[:32])  # (32, row bytes): the first rows, to stay fast; a writable copy of the mmap
        want = gguf_dequantize(raw, t.tensor_type)  # (32, row elements) fp32
        got = dequantize_gguf(torch.from_numpy(raw), ggml_type, want.shape)
        assert_bits_equal(got, torch.from_numpy(want))
        rows = torch.from_numpy(raw[:4]).to(device)
        for dtype in OUT_DTYPES:
            assert_bits_equal(dequant_gguf(rows, ggml_type, got[:4].shape, dtype).cpu(), got[:4].to(dtype))


@pytest.mark.parametrize("name", list(DEQUANTS))
def test_dequant_gguf_bad_input_names_the_value(name, device):
    dequant = DEQUANTS[name]
    raw = torch.from_numpy(random_blocks("Q8_0", 2, seed=0)).to(device)  # (2, 34)
    with pytest.raises(ValueError, match=r"'Q3_K'.*Q8_0, Q4_0"):
        dequant(raw, "Q3_K", (64,))
    with pytest.raises(ValueError, match="float32"):
        dequant(raw.float(), "Q8_0", (64,))
    with pytest.raises(ValueError, match="35 bytes"):
        dequant(raw.reshape(-1)[:35], "Q8_0", (32,))
    with pytest.raises(ValueError, match=r"shape \(3, 33\)"):
        dequant(raw, "Q8_0", (3, 33))
    with pytest.raises(ValueError, match="float64"):
        dequant(raw, "Q8_0", (64,), torch.float64)


@pytest.mark.gpu
@pytest.mark.parametrize("ggml_type", TYPES)
def test_dequant_gguf_kernel_7b_matrix(ggml_type):
    n_elems = GGUF_BLOCKS[ggml_type][0]
    n_blocks = 4096 * 4096 // n_elems  # one 4096 x 4096 weight
    raw = torch.from_numpy(random_blocks(ggml_type, n_blocks, seed=7))
    want = dequantize_gguf(raw, ggml_type, (4096, 4096))
    for dtype in OUT_DTYPES:
        assert_bits_equal(dequant_gguf(raw.cuda(), ggml_type, (4096, 4096), dtype).cpu(), want.to(dtype))
