"""Residual add + RMSNorm kernel vs reference.add_rms_norm: h and y forward, the gradients of x, residual and the
weight with both outputs' gradients non-zero, fp32 and bf16, odd and wide rows, strided inputs, bad inputs."""
from __future__ import annotations

import importlib

import pytest
import torch
from torch import Tensor

import llama_erc.kernels as K
from llama_erc.kernels import REFERENCE as REF
from tests.kernels.helpers import check_grads, randn, upcast
from tests.tolerances import TOL, assert_close, assert_ratio

add_rms_norm_module = importlib.import_module("llama_erc.kernels.add_rms_norm")  # `kernels.add_rms_norm`: the function
rms_norm_module = importlib.import_module("llama_erc.kernels.rms_norm")
DTYPES = [torch.float32, torch.bfloat16]
GRADS = ["row", "row", "cross_row", None]  # x, residual, weight, eps


def _inputs(shape, dtype, device, x_grad=True, r_grad=True, w_grad=True, seed=0):
    x = randn(shape, dtype, device, seed).requires_grad_(x_grad)  # the attention output
    r = randn(shape, dtype, device, seed + 1, 2.0).requires_grad_(r_grad)  # the residual stream
    w = (1.0 + randn(shape[-1:], torch.float32, device, seed + 2, 0.5)).to(dtype).requires_grad_(w_grad)
    dh = randn(shape, dtype, device, seed + 3)  # the gradient reaching h from the residual stream
    dy = randn(shape, dtype, device, seed + 4)
    return (x, r, w, 1e-5), dh, dy


def _run(fn, inputs, dh: Tensor | None, dy: Tensor | None) -> tuple[Tensor, Tensor, tuple]:
    """h, y = fn(*inputs), and the grads of <h, dh> + <y, dy> for every tensor input that requires grad (dh or dy
    None: that output is unused, so its gradient never reaches the op; an output that needs no grad, the twin's h
    when only the weight trains, is left out too)."""
    leaves = [t.detach().requires_grad_(t.requires_grad) if isinstance(t, Tensor) else t for t in inputs]
    h, y = fn(*leaves)
    outs = [(o, g) for o, g in ((h, dh), (y, dy)) if g is not None and o.requires_grad]
    wrt = [t for t in leaves if isinstance(t, Tensor) and t.requires_grad]
    grads = iter(torch.autograd.grad([o for o, _ in outs], wrt, [g for _, g in outs]) if wrt else ())
    return h.detach(), y.detach(), tuple(next(grads) if isinstance(t, Tensor) and t.requires_grad else None
                                         for t in leaves)


def _twin32(h_dtype: torch.dtype):
    """The twin in fp32 with its one rounding kept: h = x + r rounded to h_dtype (the spec's h, which the norm
    reads), its gradient passed through unrounded. With h left exact instead, ref32 would be another function:
    in bf16 the rounding of h moves dw's row sums (which can cancel) past the cross_row tolerance at 64 x 256,
    for the bf16 twin (9 values) as for the kernel (1)."""
    def twin(x, r, w, eps):
        h = x + r
        h = h + (h.to(h_dtype).float() - h).detach()  # straight through: the value rounded, the gradient not
        return h, REF.rms_norm(h, w, eps)
    return twin


def _check(inputs, dh: Tensor | None, dy: Tensor | None, grad_kinds=GRADS) -> None:
    """Kernel vs the twin run in fp32 on the same values (within TOL), and vs the twin in the inputs' dtype (h bit
    for bit; bf16: no more than 2x as far from the fp32 twin as torch in bf16)."""
    dtype = inputs[0].dtype
    h, y, grads = _run(K.add_rms_norm, inputs, dh, dy)
    twin32 = _twin32(torch.promote_types(inputs[0].dtype, inputs[1].dtype))
    h32, y32, grads32 = _run(twin32, upcast(inputs), *(None if g is None else g.float() for g in (dh, dy)))
    h_eager, y_eager, grads_eager = _run(REF.add_rms_norm, inputs, dh, dy)
    assert (h.dtype, y.dtype) == (h_eager.dtype, y_eager.dtype) and h.shape == y.shape == inputs[0].shape
    assert torch.equal(h, h_eager), "h must be the eager add: the exact sum rounded once"
    assert_close(y, y32, TOL["row"][dtype], msg="forward y")
    if dtype is torch.bfloat16:
        assert_ratio(y, y32, baseline=y_eager)
    check_grads(inputs, grads, grads32, grad_kinds, dtype, grads_eager if dtype is torch.bfloat16 else None)


@pytest.mark.parametrize("shape", [(1, 1, 8), (2, 7, 41), (3, 5, 128), (5, 96), (64, 256)],
                         ids=["one-row", "odd-N", "pow2", "N96", "64x256"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_add_rms_norm_matches_reference(shape, dtype, device):
    inputs, dh, dy = _inputs(shape, dtype, device)
    _check(inputs, dh, dy)


@pytest.mark.parametrize("n", [4096, 5120, 8192], ids=["7B", "13B", "70B"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_add_rms_norm_llama_widths(n, dtype, device):
    inputs, dh, dy = _inputs((3, n), dtype, device, seed=n)
    _check(inputs, dh, dy)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [4096, 5120, 8192])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_add_rms_norm_training_shape(n, dtype, device):
    inputs, dh, dy = _inputs((8, 512, n), dtype, device, seed=n)  # 4096 tokens: dw reduced over many programs
    _check(inputs, dh, dy)
    inputs, dh, dy = _inputs((8, 512, n), dtype, device, w_grad=False, seed=n)  # LoRA: the norm frozen
    _check(inputs, dh, dy, ["row", "row", None, None])


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_add_rms_norm_frozen_weight_gives_no_weight_grad(dtype, device):
    inputs, dh, dy = _inputs((2, 5, 40), dtype, device, w_grad=False)  # LoRA: norm weights frozen
    _check(inputs, dh, dy, ["row", "row", None, None])
    x, r, w, eps = inputs
    h, y = K.add_rms_norm(x, r, w, eps)
    ((h * dh).sum() + (y * dy).sum()).backward()
    assert x.grad is not None and r.grad is not None and w.grad is None


def test_add_rms_norm_weight_grad_only(device):
    inputs, dh, dy = _inputs((4, 3, 24), torch.float32, device, x_grad=False, r_grad=False)
    _check(inputs, dh, dy, [None, None, "cross_row", None])


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_add_rms_norm_one_side_needs_grad(dtype, device):
    inputs, dh, dy = _inputs((3, 7, 33), dtype, device, r_grad=False)  # e.g. a frozen embedding as the residual
    _check(inputs, dh, dy, ["row", None, "cross_row", None])
    inputs, dh, dy = _inputs((3, 7, 33), dtype, device, x_grad=False)
    _check(inputs, dh, dy, [None, "row", "cross_row", None])


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_add_rms_norm_unused_output(dtype, device):
    # h not used again: its gradient is None and the kernel adds nothing; y not used: only dh flows through
    inputs, _, dy = _inputs((4, 5, 48), dtype, device)
    _check(inputs, None, dy)
    inputs, dh, _ = _inputs((4, 5, 48), dtype, device, w_grad=False)  # the twin's h does not reach w
    _check(inputs, dh, None, ["row", "row", None, None])


def test_add_rms_norm_dw_reduced_over_runs_of_tiles(device, monkeypatch):
    # few programs, each looping over several row tiles (the last one over fewer): the 7B path at test size
    monkeypatch.setattr(rms_norm_module, "DW_PROGRAMS", 3)  # the backward is rms_norm's launch
    inputs, dh, dy = _inputs((37, 1024), torch.float32, device)  # 4 rows per tile, 10 tiles, 3 programs
    _check(inputs, dh, dy)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_add_rms_norm_large_eps_and_scale(dtype, device):
    x = randn((6, 50), dtype, device, 7, scale=30.0).requires_grad_()
    r = randn((6, 50), dtype, device, 8, scale=-20.0).requires_grad_()
    w = randn((50,), dtype, device, 9).requires_grad_()
    _check((x, r, w, 0.5), randn((6, 50), dtype, device, 10), randn((6, 50), dtype, device, 11))


@pytest.mark.parametrize("layout", ["col-stride-2", "transposed", "sliced-rows"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_add_rms_norm_noncontiguous(layout, dtype, device):
    base = randn((6, 4, 160), dtype, device, 3)
    x, r = {"col-stride-2": (base[..., :80:2], base[..., 81::2]),  # (6, 4, 40), last-dim stride 2
            "transposed": (base[..., :80].transpose(0, 1), base[..., 80:].transpose(0, 1)),  # leading dims copied
            "sliced-rows": (base[:, 1:3, :40], base[:, 2:4, 100:140])}[layout]  # row stride 160 on 40-wide rows
    assert not x.is_contiguous() and not r.is_contiguous()
    w = (1.0 + randn(x.shape[-1:], dtype, device, 4)).requires_grad_()
    dh, dy = (randn(x.shape, dtype, device, s).transpose(0, 1).contiguous().transpose(0, 1) for s in (5, 6))
    assert not dh.is_contiguous() and not dy.is_contiguous()  # strided output grads too
    _check((x.requires_grad_(), r.requires_grad_(), w, 1e-5), dh, dy)


def test_add_rms_norm_expanded_grads(device):
    # (h.sum() + y.sum()).backward() hands the kernel stride-0 dh and dy
    (x, r, w, eps), _, _ = _inputs((3, 4, 24), torch.float32, device)
    h, y = K.add_rms_norm(x, r, w, eps)
    (h.sum() + y.sum()).backward()
    x32, r32, w32 = (t.detach().clone().requires_grad_() for t in (x, r, w))
    h32, y32 = REF.add_rms_norm(x32, r32, w32, eps)
    (h32.sum() + y32.sum()).backward()
    assert_close(x.grad, x32.grad, TOL["row"][torch.float32])
    assert_close(r.grad, r32.grad, TOL["row"][torch.float32])
    assert_close(w.grad, w32.grad, TOL["cross_row"][torch.float32])


def test_add_rms_norm_backward_twice_on_a_retained_graph(device):
    # nothing saved is written in place: a second backward gives the same grads
    (x, r, w, eps), dh, dy = _inputs((5, 40), torch.bfloat16, device)
    h, y = K.add_rms_norm(x, r, w, eps)
    first = torch.autograd.grad((h, y), (x, r, w), (dh, dy), retain_graph=True)
    second = torch.autograd.grad((h, y), (x, r, w), (dh, dy))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_add_rms_norm_bf16_follows_reference_cast_points(device):
    # h is rounded to bf16 once, and the norm reads that h: y equals the bf16 reference bit for bit except where
    # fp32 rounding noise crosses a bf16 rounding boundary
    (x, r, w, eps), _, _ = _inputs((16, 256), torch.bfloat16, device)
    h, y = K.add_rms_norm(x, r, w, eps)
    h_ref, y_ref = REF.add_rms_norm(x, r, w, eps)
    assert torch.equal(h, h_ref)
    same = (y == y_ref).float().mean().item()
    assert same > 0.99, f"only {same:.1%} of outputs equal the bf16 reference"


def test_add_rms_norm_mixed_dtypes_promote(device):
    # a bf16 branch added to an fp32 residual stream, with an fp32 weight: h and y are fp32, as in the twin
    x = randn((4, 40), torch.bfloat16, device, 0).requires_grad_()
    r = randn((4, 40), torch.float32, device, 1).requires_grad_()
    w = randn((40,), torch.float32, device, 2).requires_grad_()
    dh, dy = randn((4, 40), torch.float32, device, 3), randn((4, 40), torch.float32, device, 4)
    h, y, (dx, dr, dw, _) = _run(K.add_rms_norm, (x, r, w, 1e-5), dh, dy)
    h_ref, y_ref, (dx_ref, dr_ref, dw_ref, _) = _run(REF.add_rms_norm, (x, r, w, 1e-5), dh, dy)
    assert h.dtype == y.dtype == torch.float32 and (dx.dtype, dr.dtype, dw.dtype) == (x.dtype, r.dtype, w.dtype)
    assert torch.equal(h, h_ref)
    assert_close(y, y_ref, TOL["row"][torch.float32])
    assert_close(dx, dx_ref, TOL["row"][torch.bfloat16])
    assert_close(dr, dr_ref, TOL["row"][torch.float32])
    assert_close(dw, dw_ref, TOL["cross_row"][torch.float32])


def test_add_rms_norm_empty(device):
    x = torch.zeros((0, 3, 16), device=device, requires_grad=True)
    r = torch.zeros((0, 3, 16), device=device, requires_grad=True)
    w = torch.ones(16, device=device, requires_grad=True)
    h, y = K.add_rms_norm(x, r, w)
    (h.sum() + y.sum()).backward()
    assert h.shape == y.shape == x.shape and torch.equal(w.grad, torch.zeros_like(w))
    assert x.grad.shape == r.grad.shape == x.shape


def test_add_rms_norm_in_the_op_sets():
    assert K.select_ops(triton=True).add_rms_norm is K.add_rms_norm
    assert K.select_ops().add_rms_norm is REF.add_rms_norm and K.REFERENCE_OPS.add_rms_norm is REF.add_rms_norm


def test_add_rms_norm_validation(device):
    x, r, w = torch.randn(2, 8, device=device), torch.randn(2, 8, device=device), torch.ones(8, device=device)
    with pytest.raises(ValueError, match=r"residual \(2, 7\) must have the shape of x \(2, 8\)"):
        K.add_rms_norm(x, r[:, :7], w)
    with pytest.raises(ValueError, match=r"residual \(1, 8\)"):  # no broadcasting: the residual is a full stream
        K.add_rms_norm(x, r[:1], w)
    with pytest.raises(ValueError, match=r"weight \(7,\).*x is \(2, 8\)"):
        K.add_rms_norm(x, r, torch.ones(7, device=device))
    with pytest.raises(ValueError, match=r"weight \(1, 8\)"):
        K.add_rms_norm(x, r, torch.ones(1, 8, device=device))
    with pytest.raises(ValueError, match="x has dtype torch.float64"):
        K.add_rms_norm(x.double(), r, w)
    with pytest.raises(ValueError, match="residual has dtype torch.int64"):
        K.add_rms_norm(x, torch.ones(2, 8, dtype=torch.long, device=device), w)
    with pytest.raises(ValueError, match="residual must be a torch.Tensor"):
        K.add_rms_norm(x, 1.0, w)
    with pytest.raises(ValueError, match="one device"):
        K.add_rms_norm(x, r.to("meta"), w)
    with pytest.raises(ValueError, match="16385 elements"):  # a row past 64 KB of fp32
        K.add_rms_norm(torch.randn(1, 16385, device=device), torch.randn(1, 16385, device=device),
                       torch.ones(16385, device=device))
    bwd = add_rms_norm_module.add_rms_norm_bwd
    with pytest.raises(ValueError, match=r"dy \(2, 9\)"):
        bwd(torch.randn(2, 9, device=device), None, x, w, torch.ones(2, device=device))
    with pytest.raises(ValueError, match=r"dres \(3, 8\)"):  # dh, read by rms_norm's backward as dres
        bwd(torch.randn(2, 8, device=device), torch.randn(3, 8, device=device), x, w, torch.ones(2, device=device))
    with pytest.raises(ValueError, match=r"rstd \(3,\)"):
        bwd(torch.randn(2, 8, device=device), None, x, w, torch.ones(3, device=device))
