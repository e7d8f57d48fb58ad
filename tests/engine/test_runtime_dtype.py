"""dtype auto follows the hardware (engine/runtime.py): bf16 where bf16 matmuls are native, fp32 elsewhere, never
bf16 for a run that trained in fp32; train.py prints and records what it chose."""
import json
import os
import subprocess
import sys

import pytest
import torch

from llama_erc.engine import runtime
from llama_erc.engine.runtime import resolve_dtype


def test_named_dtypes_are_taken_as_they_are():
    cpu = torch.device("cpu")
    assert resolve_dtype("bf16", cpu) == (torch.bfloat16, "")
    assert resolve_dtype("fp32", cpu, trained="bf16") == (torch.float32, "")
    with pytest.raises(ValueError, match="--dtype must be one of auto, bf16, fp32, got 'fp16'"):
        resolve_dtype("fp16", cpu)


@pytest.mark.parametrize("native,want", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_on_cpu_follows_native_bf16(monkeypatch, native, want):
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: (native, "a test's CPU"))
    dtype, reason = resolve_dtype("auto", torch.device("cpu"))
    assert dtype == want and reason.startswith(f"auto -> {runtime.DTYPE_NAMES[want]}") and "a test's CPU" in reason
    # a run trained in fp32 is evaluated in fp32 whatever the CPU
    assert resolve_dtype("auto", torch.device("cpu"), trained="fp32")[0] == torch.float32
    assert resolve_dtype("auto", torch.device("cpu"), trained="bf16")[0] == want


def test_this_cpu_answers_as_onednn_does():
    native, how = runtime.cpu_has_native_bf16()
    assert native == torch.ops.mkldnn._is_mkldnn_bf16_supported() and torch.backends.cpu.get_cpu_capability() in how


def test_a_cpu_limited_to_avx2_gets_fp32():
    """oneDNN capped at AVX2 (what an AVX2-only CPU gives): no native bf16, so auto picks fp32."""
    code = ("import torch\nfrom llama_erc.engine.runtime import resolve_dtype\n"
            "dtype, reason = resolve_dtype('auto', torch.device('cpu'))\nprint(dtype, '|', reason)\n")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("torch.float32 | auto -> fp32: this CPU has no native bf16 matmul"), out.stdout


def test_probe_where_torch_has_no_onednn_check(monkeypatch):
    monkeypatch.setattr(runtime, "_onednn_bf16_check", lambda: None)
    native, how = runtime.cpu_has_native_bf16()
    assert isinstance(native, bool) and "measured bf16 matmul" in how


def test_train_prints_and_records_the_chosen_dtype(tmp_path, demo_tokenizer, capsys):
    from llama_erc.demo import DEMO_DATA
    from llama_erc.engine.train import main
    out = tmp_path / "run"
    assert main(["--model", "tiny", "--tokenizer", demo_tokenizer, "--train_data", f"meld={DEMO_DATA}", "--dtype",
                 "auto", "--device", "cpu", "--kernels", "off", "--micro_batch", "2", "--grad_accum", "1",
                 "--max_steps", "1", "--out_dir", str(out)]) == 0
    want, reason = resolve_dtype("auto", torch.device("cpu"))
    assert f"dtype: {reason}" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["dtype"] == runtime.DTYPE_NAMES[want]
    record = json.loads((out / "checkpoints" / "step_0000001" / "config.json").read_text())
    assert record["train"]["dtype"] == runtime.DTYPE_NAMES[want] and record["runtime"]["dtype_reason"] == reason
