"""The benchmarks time the code users run: bench.py and the memory benchmark build their model with the one
model build (engine.build.build_lora_model) and step it with the training step itself (engine.step.train_step)."""
import json

import pytest

from llama_erc.benchmarks import bench, train_memory
from llama_erc.engine import build, step


def _spy(monkeypatch, module, name: str, real) -> list:
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(module, name, wrapper)
    return calls


def test_bench_builds_and_steps_as_training_does(tmp_path, monkeypatch):
    pytest.importorskip("peft")
    builds = _spy(monkeypatch, bench, "build_lora_model", build.build_lora_model)
    steps = _spy(monkeypatch, bench, "train_step", step.train_step)
    assert bench.main(["--device", "cpu", "--model", "tiny", "--dtype", "fp32", "--kernels", "off", "--mode", "fixed",
                       "--seq-len", "16", "--micro-batch", "2", "--steps", "2", "--warmup", "1", "--systems", "ours",
                       "--out", str(tmp_path)]) == 0
    assert len(builds) == 1 and len(steps) == 3  # warm-up + measured steps, each the training step


def test_memory_benchmark_builds_and_steps_as_training_does(tmp_path, monkeypatch):
    builds = _spy(monkeypatch, train_memory, "build_lora_model", build.build_lora_model)
    steps = _spy(monkeypatch, train_memory, "train_step", step.train_step)
    out = tmp_path / "memory.json"
    assert train_memory.main(["--preset", "tiny", "--device", "cpu", "--dtype", "fp32", "--kernels", "off",
                              "--micro_batch", "2", "--seq_len", "16", "--steps", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert len(builds) == 1 and len(steps) == 2 and result["n_trainable"] > 0 and result["loss"] > 0
