"""Fused Triton kernels for the LLaMA 2 engine, and their pure-torch specs.

Public API (what `model` may import): `rms_norm`, `swiglu`, `apply_rope`, and `REFERENCE`, the namespace of
pure-torch twins with the same signatures (`REFERENCE.rms_norm`, ...), plus `REFERENCE.rope_cos_sin`.

Set TRITON_INTERPRET=1 before importing this package to run the kernels on CPU.
"""
from . import reference as REFERENCE

__all__ = ["REFERENCE"]
