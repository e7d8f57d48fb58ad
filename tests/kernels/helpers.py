"""Shared checks for kernel tests: run an op forward and backward, compare with the pure-torch reference.

For a bf16 case the spec is `ref32`, the reference run in fp32 on the same bf16-rounded inputs; the kernel must
be within the TOL ceiling of it, and (ratio check) no more than 2x as far from it as the reference run in bf16.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from tests.tolerances import TOL, assert_close, assert_ratio


def randn(shape, dtype: torch.dtype, device: str, seed: int, scale: float = 1.0) -> Tensor:
    """Seeded N(0, scale^2) in fp32, then rounded to dtype (so ref32 sees exactly the kernel's inputs)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(device=device, dtype=dtype)


def run_with_grads(fn: Callable, inputs: Sequence, dy: Tensor) -> tuple[Tensor, tuple]:
    """y = fn(*inputs), and the grads of <y, dy> for every tensor input that requires grad (else None)."""
    # detach() keeps the strides (clone() would make a strided input contiguous and hide the layout under test)
    leaves = [t.detach().requires_grad_(t.requires_grad) if isinstance(t, Tensor) else t for t in inputs]
    y = fn(*leaves)
    wrt = [t for t in leaves if isinstance(t, Tensor) and t.requires_grad]
    grads = iter(torch.autograd.grad(y, wrt, dy)) if wrt else iter(())
    return y.detach(), tuple(next(grads) if isinstance(t, Tensor) and t.requires_grad else None for t in leaves)


def upcast(inputs: Sequence) -> list:
    """The same values in fp32 (bf16 -> fp32 is exact), keeping requires_grad."""
    return [t.detach().float().requires_grad_(t.requires_grad) if isinstance(t, Tensor) else t for t in inputs]


def check_against_reference(kernel: Callable, reference: Callable, inputs: Sequence, dy: Tensor,
                            out_kind: str, grad_kinds: Sequence[str | None]) -> None:
    """Forward and every grad (grad_kinds[i] is the TOL column of input i's grad; None: no grad expected)."""
    dtype = dy.dtype
    y, grads = run_with_grads(kernel, inputs, dy)
    y32, grads32 = run_with_grads(reference, upcast(inputs), dy.float())
    assert y.dtype == reference(*inputs).dtype and y.shape == y32.shape
    assert_close(y, y32, TOL[out_kind][dtype], msg="forward")
    grads_bf = None
    if dtype is torch.bfloat16:
        y_bf, grads_bf = run_with_grads(reference, inputs, dy)  # torch in bf16: the baseline error
        assert_ratio(y, y32, baseline=y_bf)
    check_grads(inputs, grads, grads32, grad_kinds, dtype, grads_bf)


def check_grads(inputs: Sequence, grads: Sequence, grads32: Sequence, grad_kinds: Sequence[str | None],
                dtype: torch.dtype, grads_bf: Sequence | None = None) -> None:
    """Each input's grad against its fp32 reference, within TOL[grad_kinds[i]][dtype] (None: no grad expected),
    in the input's dtype and shape; with grads_bf (the reference run in bf16), within assert_ratio of it."""
    for i, (g, g32, kind) in enumerate(zip(grads, grads32, grad_kinds)):
        if kind is None:
            assert g is None, f"input {i}: grad should be None"
            continue
        assert g.dtype == inputs[i].dtype and g.shape == inputs[i].shape
        assert_close(g, g32, TOL[kind][dtype], msg=f"grad of input {i}")
    for g, g32, g_bf in zip(grads, grads32, grads_bf or ()):
        if g is not None:
            assert_ratio(g, g32, baseline=g_bf)
