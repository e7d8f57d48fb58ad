"""Every kernel compiles for a real GPU (sm_90, H100) at the LLaMA-2 launch configs, without register spills.

The interpreter runs the kernels' Python semantics only; this is the CPU check that the compiled path (layouts,
loops with runtime bounds, split/join, the bf16 rounding helper) builds too. Needs Triton's bundled ptxas, no GPU.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

HERE = Path(__file__).resolve().parent
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


@pytest.mark.skipif(not (BIN / "ptxas").exists() or not (BIN / "cuobjdump").exists(),
                    reason="Triton's bundled ptxas / cuobjdump missing")
def test_kernels_compile_for_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # real JIT functions in the child
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is its current default
    proc = subprocess.run([sys.executable, str(HERE / "sm90_compile.py")], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {r["kernel"] for r in rows} == {
        "_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel", "_add_rms_norm_fwd_kernel", "_swiglu_fwd_kernel",
        "_swiglu_bwd_kernel", "_swiglu_bwd_flat_kernel", "_rope_kernel", "_rope_qk_kernel", "_dequant_q8_0_kernel", "_dequant_q4_kernel",
        "_dequant_k_kernel", "_dequant_q6_k_kernel", "_dequant_nf4_kernel"}
    spills = [r for r in rows if r["stack"] or r["local"]]
    assert not spills, f"register spills: {spills}"


PTX_CHECK = """
import importlib, json, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
m = importlib.import_module("llama_erc.kernels.swiglu")
sig = {"dy_ptr": "*bf16", "g_ptr": "*bf16", "u_ptr": "*bf16", "N": "i32", "BLOCK": "constexpr"}
c = triton.compile(ASTSource(fn=m._swiglu_bwd_flat_kernel, signature=sig, constexprs={"BLOCK": 1024}),
                   target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
ptx = c.asm["ptx"]
print(json.dumps({"cvt_rn_bf16": ptx.count("cvt.rn.bf16"), "emulation_mask": ptx.count("-65536")}))
"""


@pytest.mark.skipif(not (BIN / "ptxas").exists(), reason="Triton's bundled ptxas missing")
def test_compiled_bf16_stores_use_the_hardware_conversion():
    # cast_rne emulates round-to-nearest-even only under the interpreter: compiled, the stores are cvt.rn.bf16
    # (the GPU's own rounding to nearest even) and the integer emulation (its & 0xFFFF0000 mask) is gone
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", PTX_CHECK], capture_output=True, text=True, env=env, timeout=300,
                          cwd=HERE.parents[1])
    assert proc.returncode == 0, proc.stderr[-4000:]
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert counts["cvt_rn_bf16"] >= 1 and counts["emulation_mask"] == 0, counts
