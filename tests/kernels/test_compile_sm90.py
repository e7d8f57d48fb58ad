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
        "_swiglu_bwd_kernel", "_rope_kernel", "_dequant_q8_0_kernel", "_dequant_q4_kernel",
        "_dequant_k_kernel", "_dequant_q6_k_kernel", "_dequant_nf4_kernel"}
    spills = [r for r in rows if r["stack"] or r["local"]]
    assert not spills, f"register spills: {spills}"
