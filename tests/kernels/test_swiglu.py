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
