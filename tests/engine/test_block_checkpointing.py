"""--activation_checkpointing block through the training loop (the adapters of none, bit for bit, resume included)
and --activation_checkpointing auto (the default): resolved when the model is built, printed and recorded."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

import train as train_script
from llama_erc.demo import DEMO_DATA
from llama_erc.engine.checkpoint import list_checkpoints
from llama_erc.engine.config import TrainConfig
from llama_erc.engine.loop import train_loop

from tests.engine.helpers import ADAM_EPS, base_cfg, synthetic_sequences, tiny_setup


def _train(cfg, evaluator=None):
    rt, model, mcfg = tiny_setup(cfg)
    assert model.activation_checkpointing == cfg.activation_checkpointing
    state = train_loop(cfg, rt, model, mcfg, synthetic_sequences(24, seed=8), pad_id=0, evaluator=evaluator)
    return state, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _losses(out_dir):
    return [r["loss"] for r in map(json.loads, open(Path(out_dir) / "metrics.jsonl")) if "loss" in r]


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
def test_block_training_matches_none(tmp_path, fused):
    """3 steps of 2 micro-batches, LoRA dropout on: the same adapters and losses as no checkpointing, bit for bit."""
    runs = {}
    for mode in ("none", "block"):
        cfg = base_cfg(tmp_path / mode, activation_checkpointing=mode, lora_dropout=0.1, micro_batch=4,
                       grad_accum=2, max_steps=3, adam_eps=ADAM_EPS, lr=1.0, fused_lora=fused)
        runs[mode] = _train(cfg)[1], _losses(cfg.out_dir)
    assert runs["block"][1] == runs["none"][1]
    for name, x in runs["none"][0].items():
        assert torch.equal(runs["block"][0][name], x), name


def _sigterm_at_eval(model):
    os.kill(os.getpid(), signal.SIGTERM)
    return {"weighted_f1": 0.5}


def test_block_resume_is_exact(tmp_path):
    """block, stopped after step 2 and resumed to 4: the adapters and losses of 4 uninterrupted steps of none."""
    kw = dict(micro_batch=2, grad_accum=2, adam_eps=ADAM_EPS, lr=1.0, max_steps=4, lora_dropout=0.1)
    whole = base_cfg(tmp_path / "whole", activation_checkpointing="none", **kw)
    _, want = _train(whole)
    split = base_cfg(tmp_path / "split", activation_checkpointing="block", eval_every=2, **kw)
    state, _ = _train(split, evaluator=_sigterm_at_eval)  # stops after step 2's evaluation, with a checkpoint
    assert state["step"] == 2 and state.get("interrupted")
    _, got = _train(base_cfg(tmp_path / "split", activation_checkpointing="block", eval_every=2, resume=True, **kw))
    for name, x in want.items():
        assert torch.equal(got[name], x), name
    assert _losses(split.out_dir) == _losses(whole.out_dir)


def test_auto_is_the_default_and_is_resolved_printed_and_recorded(tmp_path, demo_tokenizer, capsys):
    assert TrainConfig().activation_checkpointing == "auto"
    out = tmp_path / "run"
    argv = ["--model", "tiny", "--tokenizer", demo_tokenizer, "--train_data", f"meld={DEMO_DATA}", "--out_dir",
            str(out), "--dtype", "fp32", "--device", "cpu", "--kernels", "off", "--micro_batch", "2",
            "--grad_accum", "1", "--max_steps", "1"]
    assert train_script.main(argv) == 0
    printed = capsys.readouterr().out
    assert "activation checkpointing: auto -> none: activations of 1024 tokens" in printed  # 2 x max_len 512
    assert json.loads((out / "config.json").read_text())["activation_checkpointing"] == "none"
    record = json.loads((list_checkpoints(out)[-1] / "config.json").read_text())
    assert record["train"]["activation_checkpointing"] == "none"
    # resuming with auto again (or any mode: all compute the same bits) is accepted
    assert train_script.main(argv + ["--resume", "--activation_checkpointing", "block"]) == 0


def test_auto_falls_back_when_memory_is_short(tmp_path, monkeypatch, capsys):
    """With little free memory the build picks block, with less full (engine/memory.py's estimate)."""
    import llama_erc.engine.build as build
    from llama_erc.engine.memory import activation_bytes
    from llama_erc.engine.runtime import setup_runtime
    from llama_erc.model import LoRAConfig, preset

    cfg, lora, tokens, dtype = preset("tiny"), LoRAConfig(), 4096, torch.float32
    rt = setup_runtime("cpu", "fp32", "off")
    for free_for, want in (("none", "none"), ("block", "block"), ("full", "full")):
        free = int((activation_bytes(cfg, free_for, dtype, lora, tokens, eager=True) + 512 * 2**20) / 0.8) + 1
        monkeypatch.setattr(build, "free_memory", lambda device, free=free: free)
        model, _ = build.build_lora_model("tiny", rt, lora, vocab_size=cfg.vocab_size, seed=0,
                                          activation_checkpointing="auto", tokens=tokens)
        assert model.activation_checkpointing == want
        assert f"activation checkpointing: auto -> {want}" in capsys.readouterr().out
