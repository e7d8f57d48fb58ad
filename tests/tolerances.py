"""Tolerance ceilings (rtol, atol) from ../shared/STYLE.md. Tighter is fine; looser needs a comment with the reason."""
import torch

TOL = {
    "elementwise": {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1.6e-2, 1e-2)},
    "row": {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1.6e-2, 1e-2)},
    "cross_row": {torch.float32: (1e-4, 1e-4), torch.bfloat16: (2e-2, 2e-2)},
    "logits": {torch.float32: (1e-4, 1e-4), torch.bfloat16: (5e-2, 5e-2)},
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: tuple[float, float], msg: str = "") -> None:
    """Compare in fp32 (actual is upcast) against the fp32 reference."""
    rtol, atol = tol
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol, msg=msg or None)


def assert_ratio(actual: torch.Tensor, ref32: torch.Tensor, baseline: torch.Tensor) -> None:
    """bf16 ratio check: max|actual - ref32| <= 2 * max|torch_bf16 - ref32| + 1e-6."""
    err = (actual.float() - ref32.float()).abs().max().item()
    base = (baseline.float() - ref32.float()).abs().max().item()
    assert err <= 2 * base + 1e-6, f"kernel error {err:.3e} > 2 x torch bf16 error {base:.3e}"


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / max |e|: the issue's 'max relative error' for logits."""
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max().clamp_min(1e-12)).item()
