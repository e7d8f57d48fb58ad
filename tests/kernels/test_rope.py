"""Rotary kernel vs reference.apply_rope: forward and dx, fp32 and bf16, shared and per-row tables, q/k head
counts, strided inputs."""
import importlib

import pytest
import torch

import llama_erc.kernels as K
from llama_erc.kernels import REFERENCE as REF
from tests.kernels.helpers import check_against_reference, randn
from tests.tolerances import TOL, assert_close

rope_module = importlib.import_module("llama_erc.kernels.rope")
DTYPES = [torch.float32, torch.bfloat16]
GRADS = ["elementwise", None, None]  # x only: cos/sin are constant tables


def _tables(B, T, Dh, device, per_row, seed=0):
    """Shared positions -> (T, Dh/2); per-row (packed) positions -> (B, T, Dh/2). Positions up to 4096."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.randint(0, 4096, (B, T) if per_row else (T,), generator=g).to(device)
    return REF.rope_cos_sin(pos, Dh)


def _inputs(shape, dtype, device, per_row=False, seed=0):
    B, T, H, Dh = shape
    x = randn(shape, dtype, device, seed).requires_grad_()
    cos, sin = _tables(B, T, Dh, device, per_row, seed)
    return x, cos, sin, randn(shape, dtype, device, seed + 1)


@pytest.mark.parametrize("shape", [(1, 1, 1, 2), (2, 5, 3, 6), (2, 7, 4, 16), (1, 3, 5, 24), (2, 16, 8, 32)],
                         ids=["one-pair", "odd-H-odd-pairs", "pow2", "Dh24", "2x16x8x32"])
@pytest.mark.parametrize("per_row", [False, True], ids=["shared-pos", "per-row-pos"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_rope_matches_reference(shape, per_row, dtype, device):
    x, cos, sin, dy = _inputs(shape, dtype, device, per_row)
    check_against_reference(K.apply_rope, REF.apply_rope, (x, cos, sin), dy, "elementwise", GRADS)


@pytest.mark.parametrize("heads", [32, 40, 64], ids=["7B", "13B", "70B"])  # rows of 4096 / 5120 / 8192
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_rope_llama_widths(heads, dtype, device):
    x, cos, sin, dy = _inputs((1, 2, heads, 128), dtype, device, seed=heads)
    check_against_reference(K.apply_rope, REF.apply_rope, (x, cos, sin), dy, "elementwise", GRADS)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_rope_training_shape(dtype, device):
    x, cos, sin, dy = _inputs((8, 512, 32, 128), dtype, device)
    check_against_reference(K.apply_rope, REF.apply_rope, (x, cos, sin), dy, "elementwise", GRADS)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_rope_q_and_k_head_counts(dtype, device):
    # GQA: q with 8 heads and k with 2 share one table, as in the model
    B, T, Dh = 2, 6, 16
    cos, sin = _tables(B, T, Dh, device, per_row=True)
    for i, heads in enumerate((8, 2)):
        x = randn((B, T, heads, Dh), dtype, device, 10 + i).requires_grad_()
        dy = randn((B, T, heads, Dh), dtype, device, 20 + i)
        check_against_reference(K.apply_rope, REF.apply_rope, (x, cos, sin), dy, "elementwise", GRADS)


def test_rope_batch_one_table(device):
    # a (1, T, Dh/2) table broadcasts over the batch, as in the reference
    x, cos, sin, dy = _inputs((3, 4, 2, 8), torch.float32, device)
    check_against_reference(K.apply_rope, REF.apply_rope, (x, cos[None], sin[None]), dy, "elementwise", GRADS)


@pytest.mark.parametrize("layout", ["linear-view", "heads-first", "col-stride-2", "strided-tables"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_rope_noncontiguous(layout, dtype, device):
    B, T, H, Dh = 2, 5, 3, 8
    cos, sin = _tables(B, T, Dh, device, per_row=False)
    if layout == "linear-view":  # q out of a fused qkv projection: (B, T, 3*H*Dh)[..., :H*Dh] as (B, T, H, Dh)
        x = randn((B, T, 3 * H * Dh), dtype, device, 1)[..., : H * Dh].unflatten(-1, (H, Dh))
    elif layout == "heads-first":  # (B, H, T, Dh) transposed to (B, T, H, Dh)
        x = randn((B, H, T, Dh), dtype, device, 1).transpose(1, 2)
    elif layout == "col-stride-2":
        x = randn((B, T, H, 2 * Dh), dtype, device, 1)[..., ::2]
    else:  # cos sliced out of a wider table (row stride Dh, not Dh/2), sin contiguous: each its own strides
        x = randn((B, T, H, Dh), dtype, device, 1)
        cos = torch.cat([cos, torch.zeros_like(cos)], -1)[:, : Dh // 2]
        assert not cos.is_contiguous() and sin.is_contiguous()
    dy = randn((B, H, T, Dh), dtype, device, 2).transpose(1, 2)  # the layout SDPA's grad comes back in
    assert layout == "strided-tables" or not x.is_contiguous()
    check_against_reference(K.apply_rope, REF.apply_rope, (x.requires_grad_(), cos, sin), dy, "elementwise", GRADS)


def test_rope_backward_is_inverse_rotation(device):
    # the backward kernel rotates by -theta: applied after the forward it gives x back
    x, cos, sin, _ = _inputs((2, 5, 3, 16), torch.float32, device, per_row=True)
    x = x.detach()
    back = rope_module.rope_bwd(rope_module.rope_fwd(x, cos, sin), cos, sin)
    assert_close(back, x, TOL["elementwise"][torch.float32])


def test_rope_validation(device):
    x = torch.randn(2, 5, 3, 8, device=device)
    cos, sin = REF.rope_cos_sin(torch.arange(5, device=device), 8)
    with pytest.raises(ValueError, match=r"x \(2, 5, 24\) must be \(B, T, H, Dh\)"):
        K.apply_rope(x.flatten(2), cos, sin)
    with pytest.raises(ValueError, match="Dh even"):
        K.apply_rope(torch.randn(2, 5, 3, 7, device=device), cos, sin)
    with pytest.raises(ValueError, match=r"cos \(4, 4\).*\(5, 4\)"):
        K.apply_rope(x, cos[:4], sin[:4])
    with pytest.raises(ValueError, match=r"cos \(5, 4\) and sin \(1, 5, 4\)"):
        K.apply_rope(x, cos, sin[None])
    with pytest.raises(ValueError, match=r"cos \(3, 5, 4\)"):  # batch 3 for x of batch 2
        K.apply_rope(x, cos.expand(3, 5, 4), sin.expand(3, 5, 4))
    with pytest.raises(ValueError, match="cos must be an fp32 tensor"):
        K.apply_rope(x, cos.bfloat16(), sin)
    with pytest.raises(ValueError, match="float64"):
        K.apply_rope(x.double(), cos, sin)
    with pytest.raises(ValueError, match="one device"):
        K.apply_rope(x, cos.to("meta"), sin)
    with pytest.raises(ValueError, match="does not differentiate cos/sin"):
        K.apply_rope(x, cos.requires_grad_(), sin)
