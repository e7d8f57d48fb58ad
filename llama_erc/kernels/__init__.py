"""Fused ops for the LLaMA-family engine, and their pure-torch specs.

Public API (what `model` may import):
    rms_norm, swiglu, apply_rope   Triton kernels, forward and backward (rms_norm.py, swiglu.py, rope.py)
    apply_rope_qk, apply_rope_qk_  q and k rotated in one launch, into fresh tensors or in place (rope.py)
    swiglu_                        swiglu whose backward writes the gradients over the saved gate and up
    in_place_safe                  whether the in-place ops may run here (not under selective checkpointing's
                                   dispatch mode, which caches the tensors they would overwrite)
    add_rms_norm                   the residual add and the RMSNorm after it in one launch, -> (h, y); its
                                   backward adds h's residual-stream gradient in the same launch (add_rms_norm.py)
    lora_linear                    the LoRA linear as one autograd node (lora_linear.py; torch ops, hand-written
                                   backward); its base weight may be a frozen quantized one (model/quant.py)
    dequant_gguf, dequant_nf4      Triton dequantization of a frozen base weight's packed blocks, forward only
                                   (dequant_gguf.py: Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K; dequant_nf4.py)
    dequant_linear                 y = x deq(W)^T through a frozen quantized weight: one autograd node that saves
                                   no weight, dequantizing again in backward (dequant_linear.py)
    REFERENCE                      the namespace of pure-torch twins with the same signatures (reference.py),
                                   plus REFERENCE.rope_cos_sin; each twin is its op's spec (the dequantization
                                   twins live in reference_gguf.py and reference_nf4.py)
    Ops, select_ops, REFERENCE_OPS the op set a model runs, chosen once (model.Transformer.ops)

Set TRITON_INTERPRET=1 before importing this package to run the Triton kernels on CPU. The functionals shadow
their modules here (`kernels.rms_norm` is the function); the launchers and kernels live in the modules,
reachable with importlib.import_module("llama_erc.kernels.rms_norm").

Adding an op:
1. its pure-torch spec in reference.py (no triton import there), with the math and cast points in its docstring;
2. one module, `<op>.py`, in the order of STYLE.md section 5: math docstring, `@triton.jit` kernels
   (`_<op>_fwd_kernel`, `_<op>_bwd_kernel`), launchers (`<op>_fwd`, `<op>_bwd`, checking their inputs with
   _utils), the `<Op>Function` autograd class and the functional `<op>`;
3. a field of `Ops` below and its two entries in `select_ops` (the fast op and its twin), then the model module
   that calls it through `self.ops.<op>`;
4. tests in tests/kernels/: forward and every gradient against the twin in fp32 and bf16 (odd sizes, one row,
   a non-contiguous input), with the tolerances of tests/tolerances.py, and a `gpu`-marked test at 7B sizes;
5. a row in the kernel benchmark (llama_erc/benchmarks/kernels.py), and its launches in the launch-config sweep
   (llama_erc/benchmarks/kernel_sweep.py) with their block and num_warps overridable (_utils.overridden);
6. an in-place variant, if any, is a field `<op>_` beside `<op>` that computes the same bits: it refuses to run
   where in_place_safe() is false (selective checkpointing's caching dispatch mode), the model calls `<op>` there,
   and block recompute (model/recompute.py) swaps every `<op>_` field for `<op>` itself.
"""
from collections.abc import Callable
from dataclasses import dataclass

from llama_erc.kernels import reference as REFERENCE
from llama_erc.kernels.add_rms_norm import add_rms_norm
from llama_erc.kernels.dequant_gguf import dequant_gguf
from llama_erc.kernels.dequant_linear import dequant_linear
from llama_erc.kernels.dequant_nf4 import dequant_nf4
from llama_erc.kernels.lora_linear import lora_linear
from llama_erc.kernels.reference_gguf import dequantize_gguf
from llama_erc.kernels.reference_nf4 import dequantize_nf4
from llama_erc.kernels.rms_norm import rms_norm
from llama_erc.kernels._utils import in_place_safe
from llama_erc.kernels.rope import apply_rope, apply_rope_qk, apply_rope_qk_
from llama_erc.kernels.swiglu import swiglu, swiglu_


@dataclass(frozen=True)
class Ops:
    """The op set a model's modules call (model.Transformer.ops): fused ops or their pure-torch twins."""
    rms_norm: Callable
    add_rms_norm: Callable  # (x, residual, weight, eps) -> (h = x + residual, rms_norm(h)); the block's ffn_norm
    swiglu: Callable
    swiglu_: Callable  # swiglu writing its backward over gate and up; only where in_place_safe()
    apply_rope: Callable
    apply_rope_qk: Callable  # (q, k, cos, sin) -> (q, k) rotated, fresh tensors
    apply_rope_qk_: Callable  # the same into q and k themselves; only where in_place_safe()
    lora_linear: Callable
    dequant_gguf: Callable  # (data, ggml_type, shape, dtype) -> weight; a frozen quantized base's blocks
    dequant_nf4: Callable  # (NF4Weight, dtype) -> weight


def select_ops(triton: bool = False, fused_lora: bool = False) -> Ops:
    """The Triton kernels (triton=True) or their specs for RMSNorm (alone and after the residual add), SwiGLU,
    RoPE and weight dequantization; the one-node LoRA linear (fused_lora=True) or its eager twin. Each choice
    computes the same function as the other (the dequantizations bit for bit)."""
    return Ops(rms_norm=rms_norm if triton else REFERENCE.rms_norm,
               add_rms_norm=add_rms_norm if triton else REFERENCE.add_rms_norm,
               swiglu=swiglu if triton else REFERENCE.swiglu,
               swiglu_=swiglu_ if triton else REFERENCE.swiglu_,
               apply_rope=apply_rope if triton else REFERENCE.apply_rope,
               apply_rope_qk=apply_rope_qk if triton else REFERENCE.apply_rope_qk,
               apply_rope_qk_=apply_rope_qk_ if triton else REFERENCE.apply_rope_qk_,
               lora_linear=lora_linear if fused_lora else REFERENCE.lora_linear,
               dequant_gguf=dequant_gguf if triton else dequantize_gguf,
               dequant_nf4=dequant_nf4 if triton else dequantize_nf4)


REFERENCE_OPS = select_ops()

__all__ = ["REFERENCE", "REFERENCE_OPS", "Ops", "add_rms_norm", "apply_rope", "apply_rope_qk", "apply_rope_qk_",
           "dequant_gguf", "dequant_linear", "dequant_nf4", "in_place_safe", "lora_linear", "rms_norm", "select_ops",
           "swiglu", "swiglu_"]
