"""SwiGLU kernel vs reference.swiglu: forward, dgate and dup, fp32 and bf16, odd and wide rows, strided inputs."""
import importlib

import pytest
import torch

import llama_erc.kernels as K
from llama_erc.kernels import REFERENCE as REF
from tests.kernels.helpers import check_against_reference, randn

swiglu_module = importlib.import_module("llama_erc.kernels.swiglu")  # `kernels.swiglu` itself is the function
DTYPES = [torch.float32, torch.bfloat16]
GRADS = ["elementwise", "elementwise"]


def _inputs(shape, dtype, device, seed=0, scale=2.0):
    gate = randn(shape, dtype, device, seed, scale).requires_grad_()  # scale 2: both tails of sigmoid
    up = randn(shape, dtype, device, seed + 1).requires_grad_()
    dy = randn(shape, dtype, device, seed + 2)
    return gate, up, dy


@pytest.mark.parametrize("shape", [(1, 8), (2, 7, 41), (3, 5, 128), (5, 96), (64, 256)],
                         ids=["one-row", "odd-F", "pow2", "F96", "64x256"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_swiglu_matches_reference(shape, dtype, device):
    gate, up, dy = _inputs(shape, dtype, device)
    check_against_reference(K.swiglu, REF.swiglu, (gate, up), dy, "elementwise", GRADS)


@pytest.mark.parametrize("f", [4096, 5120, 8192, 11008, 28672], ids=["7B", "13B", "70B", "7B-ffn", "70B-ffn"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_swiglu_llama_widths(f, dtype, device):
    gate, up, dy = _inputs((2, f), dtype, device, seed=f)  # F past MAX_BLOCK_F: several programs per row
    check_against_reference(K.swiglu, REF.swiglu, (gate, up), dy, "elementwise", GRADS)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_swiglu_training_shape(dtype, device):
    gate, up, dy = _inputs((8, 512, 11008), dtype, device)
    check_against_reference(K.swiglu, REF.swiglu, (gate, up), dy, "elementwise", GRADS)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_swiglu_saturated_gate(dtype, device):
    # |gate| up to ~150: exp(-gate) would overflow fp32; silu must go to 0 and g, with finite grads
    gate, up, dy = _inputs((4, 64), dtype, device, seed=5, scale=40.0)
    check_against_reference(K.swiglu, REF.swiglu, (gate, up), dy, "elementwise", GRADS)


@pytest.mark.parametrize("layout", ["fused-halves", "transposed", "col-stride-2", "mixed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_swiglu_noncontiguous(layout, dtype, device):
    base = randn((6, 4, 96), dtype, device, 3, 2.0)
    if layout == "fused-halves":  # gate and up as the two halves of one fused projection: row stride 96
        gate, up = base.chunk(2, dim=-1)
    elif layout == "transposed":  # leading dims do not merge: copied
        gate, up = base[..., :48].transpose(0, 1), base[..., 48:].transpose(0, 1)
    elif layout == "col-stride-2":
        gate, up = base[..., ::2], base[..., 1::2]
    else:  # each its own strides: contiguous gate, last-dim stride 2 up
        gate, up = base[..., :48].contiguous(), base[..., ::2]
    assert not up.is_contiguous() and (layout == "mixed" or not gate.is_contiguous())
    dy = randn(gate.shape, dtype, device, 4).transpose(0, 1).contiguous().transpose(0, 1)
    assert not dy.is_contiguous()
    check_against_reference(K.swiglu, REF.swiglu, (gate.requires_grad_(), up.requires_grad_()), dy,
                            "elementwise", GRADS)


def test_swiglu_one_input_frozen(device):
    gate, up, dy = _inputs((3, 40), torch.float32, device)
    check_against_reference(K.swiglu, REF.swiglu, (gate, up.detach()), dy, "elementwise", ["elementwise", None])


def test_swiglu_saves_inputs_not_silu(device):
    # backward recomputes silu(gate): the graph keeps only gate and up alive
    gate, up, _ = _inputs((3, 40), torch.float32, device)
    y = K.swiglu(gate, up)
    saved = y.grad_fn.saved_tensors
    assert len(saved) == 2 and saved[0] is gate and saved[1] is up


def test_swiglu_empty(device):
    gate = torch.zeros((0, 16), device=device, requires_grad=True)
    up = torch.zeros((0, 16), device=device, requires_grad=True)
    y = K.swiglu(gate, up)
    y.sum().backward()
    assert y.shape == (0, 16) and gate.grad.shape == (0, 16)


def test_swiglu_validation(device):
    g = torch.randn(2, 8, device=device)
    with pytest.raises(ValueError, match=r"up \(2, 9\).*gate \(2, 8\)"):
        K.swiglu(g, torch.randn(2, 9, device=device))
    with pytest.raises(ValueError, match="gate is torch.float32 but up is torch.bfloat16"):
        K.swiglu(g, g.bfloat16())
    with pytest.raises(ValueError, match="float64"):
        K.swiglu(g.double(), g.double())
    with pytest.raises(ValueError, match="one device"):
        K.swiglu(g, torch.randn(2, 8, device="meta"))
    with pytest.raises(ValueError, match="at least one dim"):
        K.swiglu(torch.tensor(1.0, device=device), torch.tensor(1.0, device=device))
    with pytest.raises(ValueError, match=r"dy \(2, 7\)"):
        swiglu_module.swiglu_bwd(torch.randn(2, 7, device=device), g, g)


# swiglu_: the backward written over gate and up by the flat kernel


def _non_leaf(op):
    """op on gate * 1 and up * 1: non-leaf inputs, as the model's w1/w3 outputs (x * 1 is exact and passes its
    gradient through unchanged), so the in-place backward runs; the leaves receive dgate and dup."""
    return lambda gate, up: op(gate * 1, up * 1)


@pytest.mark.parametrize("shape", [(1, 8), (1, 1), (2, 7, 41), (3, 5, 128), (4097,), (2, 11008)],
                         ids=["one-row", "one-element", "odd-F", "pow2", "one-past-a-block", "7B-ffn"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_swiglu_in_place_matches_reference(shape, dtype, device):
    gate, up, dy = _inputs(shape, dtype, device)
    check_against_reference(_non_leaf(K.swiglu_), REF.swiglu, (gate, up), dy, "elementwise", GRADS)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_swiglu_flat_backward_bit_identical_to_row_kernel(dtype, device):
    # one _swiglu_grads helper: the flat in-place kernel and the row kernel store the same bits; dy strided too
    gate, up, _ = _inputs((3, 5, 41), dtype, device)
    dy = randn((5, 3, 41), dtype, device, 7).transpose(0, 1)
    dg, du = swiglu_module.swiglu_bwd(dy, gate.detach(), up.detach())
    g_buf, u_buf = gate.detach().clone(), up.detach().clone()
    out = swiglu_module.swiglu_bwd_(dy, g_buf, u_buf)
    assert out[0] is g_buf and out[1] is u_buf
    assert torch.equal(g_buf, dg) and torch.equal(u_buf, du)


def test_swiglu_in_place_backward_writes_over_gate_and_up(device):
    gate0, up0, dy = _inputs((4, 40), torch.float32, device)
    gate, up = gate0 * 1, up0 * 1
    ptrs = (gate.data_ptr(), up.data_ptr())
    y = K.swiglu_(gate, up)
    expected = REF.swiglu(gate.detach(), up.detach())
    assert torch.equal(y, K.swiglu(gate.detach(), up.detach())) and torch.allclose(y, expected, atol=1e-6)
    y.backward(dy)
    # gate and up now hold their own gradients (the gradients the leaves received through x * 1)
    assert (gate.data_ptr(), up.data_ptr()) == ptrs
    assert torch.equal(gate.detach(), gate0.grad) and torch.equal(up.detach(), up0.grad)


def test_swiglu_in_place_retain_graph_refused(device):
    # a second backward would read gradients as gate and up: autograd's version check refuses it
    gate0, up0, dy = _inputs((3, 40), torch.float32, device)
    y = K.swiglu_(gate0 * 1, up0 * 1)
    y.backward(dy, retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward(dy)
    y = K.swiglu(gate0 * 1, up0 * 1)  # the out-of-place op allows it
    y.backward(dy, retain_graph=True)
    y.backward(dy)


@pytest.mark.parametrize("case", ["leaves", "fused-halves", "same-tensor"])
def test_swiglu_in_place_falls_back(case, device):
    # what the backward may not overwrite gets fresh gradients: leaves (user tensors), strided halves of one
    # projection (the flat range is not their elements), one tensor passed as both gate and up
    gate, up, dy = _inputs((3, 40), torch.float32, device)
    if case == "leaves":
        inputs, fn = (gate, up), K.swiglu_
    elif case == "fused-halves":
        base = randn((3, 80), torch.float32, device, 9).requires_grad_()
        inputs, fn = (base,), lambda b: K.swiglu_(*(b * 1).chunk(2, dim=-1))
    else:
        inputs, fn = (gate,), (lambda g: (lambda x: K.swiglu_(x, x))(g * 1))  # swiglu_(x, x), x non-leaf
    before = [t.detach().clone() for t in inputs]
    y = fn(*inputs)
    grads = torch.autograd.grad(y, inputs, dy)
    ref_y = {"leaves": lambda: REF.swiglu(gate, up), "fused-halves": lambda: REF.swiglu(*inputs[0].chunk(2, -1)),
             "same-tensor": lambda: REF.swiglu(gate, gate)}[case]()
    ref_grads = torch.autograd.grad(ref_y, inputs, dy)
    assert all(torch.equal(t, b) for t, b in zip(inputs, before))  # the leaves are untouched
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_swiglu_in_place_refused_under_selective_checkpointing(device):
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts
    caching, _ = create_selective_checkpoint_contexts(lambda ctx, op, *a, **kw: CheckpointPolicy.MUST_SAVE)
    gate, up, _ = _inputs((2, 8), torch.float32, device)
    with caching:
        for fn_ in (K.swiglu_, REF.swiglu_):
            with pytest.raises(RuntimeError, match="refused under an active torch dispatch mode.*use swiglu"):
                fn_(gate * 1, up * 1)
        K.swiglu(gate * 1, up * 1)


def test_swiglu_in_place_validation(device):
    g = torch.randn(2, 8, device=device)
    with pytest.raises(ValueError, match=r"gate \(2, 4\) strides \(8, 1\).*must be contiguous"):
        swiglu_module.swiglu_bwd_(torch.randn(2, 4, device=device), g[:, :4], torch.randn(2, 4, device=device))
    with pytest.raises(ValueError, match="separate storages"):
        swiglu_module.swiglu_bwd_(g, g, g)
    with pytest.raises(ValueError, match="block must be a power of two, got 1000"):
        swiglu_module.swiglu_bwd_(g, g.clone(), g.clone(), block=1000)
    with pytest.raises(ValueError, match=r"dy \(2, 7\)"):
        swiglu_module.swiglu_bwd_(torch.randn(2, 7, device=device), g.clone(), g.clone())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
def test_swiglu_in_place_training_shape(dtype, device):
    gate, up, dy = _inputs((8, 512, 11008), dtype, device)
    check_against_reference(_non_leaf(K.swiglu_), REF.swiglu, (gate, up), dy, "elementwise", GRADS)
