"""Launch configuration and the bf16 rounding helper shared by the kernels."""
import pytest
import torch
import triton
import triton.language as tl

from llama_erc.kernels._utils import (MAX_ROW_BYTES, TILE_ELEMS, cast_rne, num_warps_for, row_launch_config,
                                       rows_per_tile)


@pytest.mark.parametrize("n, block", [(1, 1), (41, 64), (128, 128), (4096, 4096), (5120, 8192), (16384, 16384)])
def test_row_launch_config_blocks(n, block):
    got, num_warps = row_launch_config(n)
    assert got == block and 1 <= num_warps <= 32 and num_warps & (num_warps - 1) == 0


def test_row_launch_config_rejects_rows_past_64kb():
    assert row_launch_config(MAX_ROW_BYTES // 4)[0] == 16384
    with pytest.raises(ValueError, match="16385 elements"):
        row_launch_config(MAX_ROW_BYTES // 4 + 1)
    with pytest.raises(ValueError, match="positive"):
        row_launch_config(0)


def test_warps_and_rows_per_tile():
    assert num_warps_for(1) == 1 and num_warps_for(4096) == 16 and num_warps_for(1 << 20) == 32
    assert rows_per_tile(4096, 4096) == 1  # a 7B row fills a tile alone
    assert rows_per_tile(64, 4096) == TILE_ELEMS // 64  # narrow rows are stacked
    assert rows_per_tile(64, 3) == 4  # but never past the (power-of-two padded) row count


@triton.jit
def _cast_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, cast_rne(tl.load(x_ptr + offs, mask=offs < n), y_ptr.dtype.element_ty), mask=offs < n)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cast_rne_matches_torch_rounding(dtype, device):
    g = torch.Generator().manual_seed(0)
    hi = 4 if dtype is torch.float16 else 20  # stay inside fp16's range (numpy warns on overflow)
    x = torch.randn(3000, generator=g) * torch.logspace(-7, hi, 3000)  # many binades
    ties = (torch.randint(-2**14, 2**14, (1000,), generator=g) * 2 + 1) * 2.0 ** -16  # exact bf16 halfway cases
    special = torch.tensor([0.0, -0.0, 1.0, float("inf"), -float("inf"), float("nan")])
    x = torch.cat([x, ties, special]).to(device)
    y = torch.empty(x.shape, dtype=dtype, device=device)
    _cast_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    ref = x.to(dtype)
    same = (y == ref) | (y.isnan() & ref.isnan())
    assert same.all(), f"{(~same).sum().item()} values rounded differently, e.g. {x[~same][:4].tolist()}"


def test_rne_emulated_only_under_the_interpreter():
    # the integer emulation runs where Triton's interpreter truncates; compiled kernels keep the GPU's own
    # conversion, which rounds to nearest even (test_compile_sm90 checks the PTX)
    import os

    from triton.runtime.interpreter import InterpretedFunction

    from llama_erc.kernels._utils import EMULATE_RNE
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    assert bool(EMULATE_RNE) == interpreted == isinstance(_cast_kernel, InterpretedFunction)


def test_launch_overrides_are_validated():
    from llama_erc.kernels._utils import overridden
    assert overridden(16, 4, None, None, "block_m") == (16, 4)
    assert overridden(16, 4, 2, 8, "block_m") == (2, 8)
    with pytest.raises(ValueError, match="block_m must be a power of two, got 3"):
        overridden(16, 4, 3, None, "block_m")
    with pytest.raises(ValueError, match="num_warps must be a power of two from 1 to 32, got 64"):
        overridden(16, 4, None, 64, "block_m")
    with pytest.raises(ValueError, match="num_warps must be a power of two from 1 to 32, got 6"):
        overridden(16, 4, None, 6, "block_m")


def test_launch_overrides_keep_the_bits(device):
    # rows per program and warps change the tiling, not the per-row math: the same bits under the interpreter
    import importlib
    rms_norm_module = importlib.import_module("llama_erc.kernels.rms_norm")
    swiglu_module = importlib.import_module("llama_erc.kernels.swiglu")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 96, generator=g).to(device, torch.bfloat16)
    w = torch.randn(96, generator=g).to(device, torch.bfloat16)
    y, rstd = rms_norm_module.rms_norm_fwd(x, w, 1e-5)
    for block_m, warps in ((1, 1), (2, 4), (8, 16)):
        y2, rstd2 = rms_norm_module.rms_norm_fwd(x, w, 1e-5, block_m=block_m, num_warps=warps)
        assert torch.equal(y, y2) and torch.equal(rstd, rstd2)
        assert torch.equal(swiglu_module.swiglu_fwd(x, y), swiglu_module.swiglu_fwd(x, y, block_m=block_m,
                                                                                    num_warps=warps))
