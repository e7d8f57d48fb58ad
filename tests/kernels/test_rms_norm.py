"""RMSNorm kernel vs reference.rms_norm: forward, dx and dw, fp32 and bf16, odd and wide rows, strided inputs."""
import importlib

import pytest
import torch

import llama_erc.kernels as K
from llama_erc.kernels import REFERENCE as REF
from tests.kernels.helpers import check_against_reference, randn, run_with_grads
from tests.tolerances import TOL, assert_close

rms_norm_module = importlib.import_module("llama_erc.kernels.rms_norm")  # `kernels.rms_norm` itself is the function
DTYPES = [torch.float32, torch.bfloat16]


def _inputs(shape, dtype, device, w_grad=True, x_grad=True, seed=0):
    x = randn(shape, dtype, device, seed).requires_grad_(x_grad)
    w = (1.0 + randn(shape[-1:], torch.float32, device, seed + 1, 0.5)).to(dtype).requires_grad_(w_grad)
    dy = randn(shape, dtype, device, seed + 2)
    return x, w, dy


@pytest.mark.parametrize("shape", [(1, 1, 8), (2, 7, 41), (3, 5, 128), (5, 96), (64, 256)],
                         ids=["one-row", "odd-N", "pow2", "N96", "64x256"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_rms_norm_matches_reference(shape, dtype, device):
    x, w, dy = _inputs(shape, dtype, device)
    check_against_reference(K.rms_norm, REF.rms_norm, (x, w, 1e-5), dy, "row", ["row", "cross_row", None])


@pytest.mark.parametrize("n", [4096, 5120, 8192], ids=["7B", "13B", "70B"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_rms_norm_llama_widths(n, dtype, device):
    x, w, dy = _inputs((3, n), dtype, device, seed=n)
    check_against_reference(K.rms_norm, REF.rms_norm, (x, w, 1e-5), dy, "row", ["row", "cross_row", None])


@pytest.mark.gpu
@pytest.mark.parametrize("n", [4096, 5120, 8192])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_rms_norm_training_shape(n, dtype, device):
    x, w, dy = _inputs((8, 512, n), dtype, device, seed=n)  # 4096 tokens: dw reduced over many programs
    check_against_reference(K.rms_norm, REF.rms_norm, (x, w, 1e-5), dy, "row", ["row", "cross_row", None])


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_rms_norm_frozen_weight_gives_no_weight_grad(dtype, device):
    x, w, dy = _inputs((2, 5, 40), dtype, device, w_grad=False)  # LoRA: norm weights frozen
    check_against_reference(K.rms_norm, REF.rms_norm, (x, w, 1e-5), dy, "row", ["row", None, None])
    x.grad = None
    K.rms_norm(x, w).backward(dy)
    assert x.grad is not None and w.grad is None


def test_rms_norm_weight_grad_only(device):
    x, w, dy = _inputs((4, 3, 24), torch.float32, device, x_grad=False)
    check_against_reference(K.rms_norm, REF.rms_norm, (x, w, 1e-5), dy, "row", [None, "cross_row", None])


def test_rms_norm_dw_reduced_over_runs_of_tiles(device, monkeypatch):
    # few programs, each looping over several row tiles (the last one over fewer): the 7B path at test size
    monkeypatch.setattr(rms_norm_module, "DW_PROGRAMS", 3)
    x, w, dy = _inputs((37, 1024), torch.float32, device)  # 4 rows per tile, 10 tiles, 3 programs
    check_against_reference(K.rms_norm, REF.rms_norm, (x, w, 1e-5), dy, "row", ["row", "cross_row", None])


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_rms_norm_large_eps_and_scale(dtype, device):
    x = randn((6, 50), dtype, device, 7, scale=30.0).requires_grad_()
    w = randn((50,), dtype, device, 8).requires_grad_()
    dy = randn((6, 50), dtype, device, 9)
    check_against_reference(K.rms_norm, REF.rms_norm, (x, w, 0.5), dy, "row", ["row", "cross_row", None])


@pytest.mark.parametrize("layout", ["col-stride-2", "transposed", "sliced-rows"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_rms_norm_noncontiguous(layout, dtype, device):
    base = randn((6, 4, 80), dtype, device, 3)
    x = {"col-stride-2": base[..., ::2],  # (6, 4, 40), last-dim stride 2
         "transposed": base.transpose(0, 1),  # (4, 6, 80): leading dims do not merge, copied
         "sliced-rows": base[:, 1:3, :40]}[layout]  # row stride 80 on a 40-wide row
    assert not x.is_contiguous()
    w = randn(x.shape[-1:], dtype, device, 4).requires_grad_()
    dy = randn(x.shape, dtype, device, 5).transpose(0, 1).contiguous().transpose(0, 1)  # strided dy too
    assert not dy.is_contiguous()
    check_against_reference(K.rms_norm, REF.rms_norm, (x.requires_grad_(), w, 1e-5), dy, "row",
                            ["row", "cross_row", None])


def test_rms_norm_expanded_grad(device):
    # y.sum().backward() hands the kernel a stride-0 dy
    x, w, _ = _inputs((3, 4, 24), torch.float32, device)
    K.rms_norm(x, w).sum().backward()
    x32, w32 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    REF.rms_norm(x32, w32).sum().backward()
    assert_close(x.grad, x32.grad, TOL["row"][torch.float32])
    assert_close(w.grad, w32.grad, TOL["cross_row"][torch.float32])


def test_rms_norm_bf16_follows_reference_cast_points(device):
    # x_hat is rounded to bf16 before the weight multiply, as in the reference: the bf16 outputs agree bit for bit
    # except where fp32 rounding noise crosses a bf16 rounding boundary (without the round trip ~30% differ)
    x, w, _ = _inputs((16, 256), torch.bfloat16, device)
    same = (K.rms_norm(x, w) == REF.rms_norm(x, w)).float().mean().item()
    assert same > 0.99, f"only {same:.1%} of outputs equal the bf16 reference"


def test_rms_norm_mixed_dtypes_promote(device):
    # bf16 activations with an fp32 weight: the reference returns fp32, so must the kernel
    x, _, _ = _inputs((4, 40), torch.bfloat16, device)
    w = randn((40,), torch.float32, device, 1).requires_grad_()
    dy = randn((4, 40), torch.float32, device, 2)
    y, (dx, dw, _) = run_with_grads(K.rms_norm, (x, w, 1e-5), dy)
    y_ref, (dx_ref, dw_ref, _) = run_with_grads(REF.rms_norm, (x, w, 1e-5), dy)
    assert y.dtype == torch.float32 and dx.dtype == torch.bfloat16 and dw.dtype == torch.float32
    assert_close(y, y_ref, TOL["row"][torch.bfloat16])
    assert_close(dx, dx_ref, TOL["row"][torch.bfloat16])
    assert_close(dw, dw_ref, TOL["cross_row"][torch.bfloat16])


def test_rms_norm_empty(device):
    x = torch.zeros((0, 3, 16), device=device, requires_grad=True)
    w = torch.ones(16, device=device, requires_grad=True)
    y = K.rms_norm(x, w)
    y.sum().backward()
    assert y.shape == x.shape and torch.equal(w.grad, torch.zeros_like(w))


def test_rms_norm_validation(device):
    x = torch.randn(2, 8, device=device)
    with pytest.raises(ValueError, match=r"weight \(7,\).*x is \(2, 8\)"):
        K.rms_norm(x, torch.ones(7, device=device))
    with pytest.raises(ValueError, match=r"weight \(1, 8\)"):
        K.rms_norm(x, torch.ones(1, 8, device=device))
    with pytest.raises(ValueError, match="float64"):
        K.rms_norm(x.double(), torch.ones(8, device=device))
    with pytest.raises(ValueError, match="int64"):
        K.rms_norm(torch.ones(2, 8, dtype=torch.long, device=device), torch.ones(8, device=device))
    with pytest.raises(ValueError, match="one device"):
        K.rms_norm(x, torch.ones(8, device="meta"))
    with pytest.raises(ValueError, match="16385 elements"):  # a row past 64 KB of fp32
        K.rms_norm(torch.randn(1, 16385, device=device), torch.ones(16385, device=device))
    with pytest.raises(ValueError, match=r"dy \(2, 9\)"):
        rms_norm_module.rms_norm_bwd(torch.randn(2, 9, device=device), x, torch.ones(8, device=device),
                                     torch.ones(2, device=device))
