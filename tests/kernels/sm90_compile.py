"""Compile every kernel for sm_90 (H100) at the LLaMA-2 launch configs and print ptxas resource usage as JSON.

Run in a process without TRITON_INTERPRET (test_compile_sm90.py does): under the interpreter the kernels and
the @triton.jit helpers they call are interpreter objects, which the compiler cannot take. Needs no GPU, only
Triton's bundled ptxas and cuobjdump.
"""
from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for `kernels`
rms_norm_module = importlib.import_module("llama_erc.kernels.rms_norm")
swiglu_module = importlib.import_module("llama_erc.kernels.swiglu")
rope_module = importlib.import_module("llama_erc.kernels.rope")
add_rms_norm_module = importlib.import_module("llama_erc.kernels.add_rms_norm")
dequant_gguf_module = importlib.import_module("llama_erc.kernels.dequant_gguf")
dequant_nf4_module = importlib.import_module("llama_erc.kernels.dequant_nf4")
from llama_erc.kernels._utils import num_warps_for, rows_per_tile  # noqa: E402
from llama_erc.kernels.reference_gguf import GGUF_BLOCKS  # noqa: E402
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _usage(kernel, pointers: dict, constexprs: dict, num_warps: int, fp_fusion: bool = True) -> dict:
    """Registers and spill bytes; unit strides are constexprs, as Triton specialises them at launch."""
    sig = {n: "constexpr" if n in constexprs else pointers.get(n, "fp32" if n in ("eps", "offset") else "i32")
           for n in kernel.arg_names}
    compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps, "enable_fp_fusion": fp_fusion})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    fields = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", out))
    return {"kernel": kernel.__name__, "constexprs": {k: str(v) for k, v in constexprs.items()},
            "num_warps": num_warps, **{k.lower(): int(v) for k, v in fields.items()}}


def main() -> int:
    rows = []
    for n in (4096, 5120, 8192):  # 7B / 13B / 70B hidden sizes, 4096 tokens
        BLOCK_M, BLOCK_N, num_warps = rms_norm_module.launch_config(4096, n)
        rows.append(_usage(rms_norm_module._rms_norm_fwd_kernel,
                           dict(x_ptr="*bf16", w_ptr="*bf16", y_ptr="*bf16", rstd_ptr="*fp32"),
                           dict(BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, stride_xn=1, stride_w=1), num_warps))
        for has_dw in (False, True):
            for has_dres in (False, True):  # with dres: add_rms_norm's backward (the residual stream's gradient)
                rows.append(_usage(rms_norm_module._rms_norm_bwd_kernel,
                                   dict(dy_ptr="*bf16", x_ptr="*bf16", w_ptr="*bf16", rstd_ptr="*fp32",
                                        dres_ptr="*bf16", dx_ptr="*bf16", dw_ptr="*fp32"),
                                   dict(BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, HAS_DX=True, HAS_DW=has_dw,
                                        HAS_DRES=has_dres, stride_xn=1, stride_dyn=1, stride_w=1, stride_drn=1),
                                   num_warps))
        rows.append(_usage(add_rms_norm_module._add_rms_norm_fwd_kernel,
                           dict(x_ptr="*bf16", r_ptr="*bf16", w_ptr="*bf16", h_ptr="*bf16", y_ptr="*bf16",
                                rstd_ptr="*fp32"),
                           dict(BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, stride_xn=1, stride_rn=1, stride_w=1), num_warps))
    BLOCK_M, BLOCK_F, _, num_warps = swiglu_module.launch_config(4096, 11008)
    consts = dict(BLOCK_M=BLOCK_M, BLOCK_F=BLOCK_F, stride_gf=1, stride_uf=1)
    rows.append(_usage(swiglu_module._swiglu_fwd_kernel, dict(g_ptr="*bf16", u_ptr="*bf16", y_ptr="*bf16"),
                       consts, num_warps))
    rows.append(_usage(swiglu_module._swiglu_bwd_kernel,
                       dict(dy_ptr="*bf16", g_ptr="*bf16", u_ptr="*bf16", dg_ptr="*bf16", du_ptr="*bf16"),
                       dict(consts, stride_dyf=1), num_warps))
    for heads in (32, 8):  # q of 7B, k of 70B (GQA)
        BLOCK_T, BLOCK_H, BLOCK_P, _, num_warps = rope_module._launch_config(8, 512, heads, 128)
        for backward in (False, True):
            rows.append(_usage(rope_module._rope_kernel,
                               dict(x_ptr="*bf16", cos_ptr="*fp32", sin_ptr="*fp32", y_ptr="*bf16"),
                               dict(BLOCK_T=BLOCK_T, BLOCK_H=BLOCK_H, BLOCK_P=BLOCK_P, BACKWARD=backward,
                                    stride_xd=1, stride_cp=1, stride_sp=1), num_warps))
    block = swiglu_module.TILE_ELEMS  # swiglu_'s flat in-place backward at its default block
    rows.append(_usage(swiglu_module._swiglu_bwd_flat_kernel, dict(dy_ptr="*bf16", g_ptr="*bf16", u_ptr="*bf16"),
                       dict(BLOCK=block), num_warps_for(block)))
    for n_kv in (32, 8):  # q and k in one launch: 7B (32 kv heads), and GQA with 8
        BLOCK_T, BLOCK_H, BLOCK_P, _, num_warps = rope_module.qk_launch_config(8, 512, 32, n_kv, 128)
        for backward in (False, True):
            rows.append(_usage(rope_module._rope_qk_kernel,
                               dict(q_ptr="*bf16", k_ptr="*bf16", cos_ptr="*fp32", sin_ptr="*fp32", qo_ptr="*bf16",
                                    ko_ptr="*bf16"),
                               dict(BLOCK_T=BLOCK_T, BLOCK_H=BLOCK_H, BLOCK_P=BLOCK_P, BACKWARD=backward,
                                    stride_qd=1, stride_kd=1, stride_qod=1, stride_kod=1, stride_cp=1, stride_sp=1),
                               num_warps))
    n_elems = 11008 * 4096  # one 7B FFN weight
    for ggml_type, (kernel, extra) in dequant_gguf_module.KERNELS.items():
        elems, nbytes = GGUF_BLOCKS[ggml_type]
        blocks = rows_per_tile(elems, n_elems // elems)
        rows.append(_usage(kernel, dict(q_ptr="*u8", y_ptr="*bf16"),
                           dict(BLOCKS=blocks, BYTES=nbytes, ELEMS=elems, **extra), num_warps_for(blocks * elems),
                           fp_fusion=False))
    block_bytes = dequant_nf4_module.TILE_BYTES
    rows.append(_usage(dequant_nf4_module._dequant_nf4_kernel,
                       dict(packed_ptr="*u8", absmax_code_ptr="*u8", nested_absmax_ptr="*fp32",
                            nested_code_ptr="*fp32", nf4_ptr="*fp32", y_ptr="*bf16", n_bytes="i64", n="i64"),
                       dict(BLOCK_BYTES=block_bytes, NF4_BLOCK=64, NESTED_BLOCK=256),
                       num_warps_for(2 * block_bytes), fp_fusion=False))
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
