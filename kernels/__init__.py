"""Fused Triton kernels for the LLaMA 2 engine, and their pure-torch specs.

Public API (what `model` may import): `rms_norm`, `swiglu`, `apply_rope`, and `REFERENCE`, the namespace of
pure-torch twins with the same signatures (`REFERENCE.rms_norm`, ...), plus `REFERENCE.rope_cos_sin`.

Set TRITON_INTERPRET=1 before importing this package to run the kernels on CPU.
The functionals shadow their modules here (`kernels.rms_norm` is the function); the launchers and kernels live
in the modules, reachable with importlib.import_module("kernels.rms_norm").
"""
from . import reference as REFERENCE
from .rms_norm import rms_norm
from .rope import apply_rope
from .swiglu import swiglu

__all__ = ["REFERENCE", "apply_rope", "rms_norm", "swiglu"]
