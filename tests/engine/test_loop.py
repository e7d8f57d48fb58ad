"""The training loop: gradient accumulation, exact resume, signals, non-finite stops, bad arguments."""
import json
import os
import signal

import pytest
import torch

from llama_erc.engine.checkpoint import list_checkpoints
from llama_erc.engine.config import TrainConfig
from llama_erc.engine.loop import NonFiniteError, train_loop
from llama_erc.kernels import REFERENCE, lora_linear
from llama_erc.model.lora import LoRALinear
from llama_erc.engine.optim import OptimConfig, lr_at

from tests.engine.helpers import ADAM_EPS, base_cfg, synthetic_sequences, tiny_setup


def _adapters(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _run(cfg, seqs, evaluator=None):
    rt, model, mcfg = tiny_setup(cfg)
    state = train_loop(cfg, rt, model, mcfg, seqs, pad_id=0, evaluator=evaluator)
    return state, model


def _losses(cfg):
    path = os.path.join(cfg.out_dir, "metrics.jsonl")
    return [r["loss"] for r in map(json.loads, open(path)) if "loss" in r]


def test_grad_accum_equivalence(tmp_path):
    """1 x 8 and 4 x 2 micro-batching give the same update (loss normalised over the whole global batch)."""
    seqs = synthetic_sequences(24)
    _, a = _run(base_cfg(tmp_path / "a", micro_batch=8, grad_accum=1, max_steps=3, adam_eps=ADAM_EPS, lr=1.0), seqs)
    _, b = _run(base_cfg(tmp_path / "b", micro_batch=2, grad_accum=4, max_steps=3, adam_eps=ADAM_EPS, lr=1.0), seqs)
    for (name, x), y in zip(_adapters(a).items(), _adapters(b).values()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7, msg=name)
    assert any(x.abs().sum() > 0 for n, x in _adapters(a).items() if n.endswith("lora_b")), "adapters never moved"


def test_resume_is_bit_identical(tmp_path):
    """A run stopped by SIGTERM at step 3 and resumed ends bit-identical to an uninterrupted one (with dropout)."""
    seqs = synthetic_sequences(40)
    kw = dict(micro_batch=2, grad_accum=2, epochs=2, lora_dropout=0.1, save_every=2, eval_every=3)

    full_cfg = base_cfg(tmp_path / "full", **kw)
    _, full = _run(full_cfg, seqs, evaluator=lambda m: {"weighted_f1": 0.5})

    def interrupt_once(model, fired=[]):
        if not fired:
            fired.append(1)
            os.kill(os.getpid(), signal.SIGTERM)  # delivered to the loop's handler, as from a scheduler
        return {"weighted_f1": 0.5}

    cut_cfg = base_cfg(tmp_path / "cut", **kw)
    state, _ = _run(cut_cfg, seqs, evaluator=interrupt_once)
    assert state.get("interrupted") and state["step"] == 3
    assert list_checkpoints(cut_cfg.out_dir)[-1].name == "step_0000003"
    resumed_cfg = base_cfg(tmp_path / "cut", resume=True, **kw)
    state, resumed = _run(resumed_cfg, seqs, evaluator=lambda m: {"weighted_f1": 0.5})
    assert state["step"] == 20
    for (name, x), y in zip(_adapters(full).items(), _adapters(resumed).values()):
        assert torch.equal(x, y), name
    assert _losses(full_cfg) == _losses(resumed_cfg)
    assert len(list_checkpoints(resumed_cfg.out_dir)) == resumed_cfg.keep_last


def test_refuses_to_overwrite_and_checks_resume_config(tmp_path):
    seqs = synthetic_sequences(8)
    cfg = base_cfg(tmp_path, max_steps=1)
    _run(cfg, seqs)
    with pytest.raises(ValueError, match="--resume"):
        _run(cfg, seqs)
    with pytest.raises(ValueError, match="lr: checkpoint 0.01 vs now 0.02"):
        _run(base_cfg(tmp_path, max_steps=2, lr=2e-2, resume=True), seqs)


def test_resume_from_checkpoint_that_predates_a_config_field(tmp_path):
    seqs = synthetic_sequences(8)
    _run(base_cfg(tmp_path, max_steps=1), seqs)
    ckpt = list_checkpoints(tmp_path / "run")[-1]
    saved = json.loads((ckpt / "config.json").read_text())
    del saved["train"]["packing"]  # as written before --packing existed; its default is False
    (ckpt / "config.json").write_text(json.dumps(saved))
    state, _ = _run(base_cfg(tmp_path, max_steps=1, resume=True), seqs)
    assert state["step"] == 1
    with pytest.raises(ValueError, match="packing: checkpoint False vs now True"):
        _run(base_cfg(tmp_path, max_steps=1, resume=True, packing=True), seqs)


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path):
    def poison(model):  # after step 4's checkpoint is decided, the base weights go bad
        with torch.no_grad():
            model.tok_embeddings.weight.fill_(float("nan"))
        return {"weighted_f1": 0.0}

    cfg = base_cfg(tmp_path, max_steps=6, save_every=1, eval_every=4)
    with pytest.raises(NonFiniteError, match="step 5"):
        _run(cfg, synthetic_sequences(8), evaluator=poison)
    assert [p.name for p in list_checkpoints(cfg.out_dir)] == ["step_0000003", "step_0000004"]


def test_dataset_smaller_than_global_batch(tmp_path):
    with pytest.raises(ValueError, match="fewer than one global batch"):
        _run(base_cfg(tmp_path, micro_batch=4, grad_accum=4), synthetic_sequences(10))


@pytest.mark.parametrize("kw, match", [
    (dict(micro_batch=0), "micro_batch"), (dict(dtype="fp16"), "dtype"), (dict(lr=-1.0), "lr"),
    (dict(train_data=("csv=/x",)), "KIND=PATH"), (dict(context_turns="few"), "context_turns"),
    (dict(epochs=0, max_steps=0), "epochs"),
])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw)


def test_lr_schedule_warmup_then_cosine():
    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=4)
    assert [lr_at(s, cfg, 14) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(9, cfg, 14) == pytest.approx(0.55)
    assert lr_at(14, cfg, 14) == pytest.approx(0.1)


def test_fused_lora_training_matches_eager(tmp_path):
    """--fused_lora is the same function as the eager adapters: the same adapters after 3 steps, dropout on."""
    seqs = synthetic_sequences(24, seed=7)
    runs = {}
    for fused in (False, True):
        cfg = base_cfg(tmp_path / str(fused), fused_lora=fused, lora_dropout=0.1, micro_batch=4, grad_accum=2,
                       max_steps=3, adam_eps=ADAM_EPS, lr=1.0, activation_checkpointing="full")
        rt, model, mcfg = tiny_setup(cfg)
        assert all(m.ops.lora_linear is (lora_linear if fused else REFERENCE.lora_linear)
                   for m in model.modules() if isinstance(m, LoRALinear))
        train_loop(cfg, rt, model, mcfg, seqs, pad_id=0)
        runs[fused] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for name, x in runs[False].items():
        torch.testing.assert_close(runs[True][name], x, rtol=1e-5, atol=1e-7, msg=name)
    assert any(x.abs().sum() > 0 for n, x in runs[True].items() if n.endswith("lora_b")), "adapters never moved"


def test_selective_checkpointing_training_matches_none(tmp_path):
    """--activation_checkpointing selective through the whole loop: the same adapters as no checkpointing."""
    seqs = synthetic_sequences(24, seed=8)
    runs = {}
    for mode in ("none", "selective"):
        cfg = base_cfg(tmp_path / mode, activation_checkpointing=mode, lora_dropout=0.1, micro_batch=4,
                       grad_accum=2, max_steps=3, adam_eps=ADAM_EPS, lr=1.0, fused_lora=True)
        rt, model, mcfg = tiny_setup(cfg)
        assert model.activation_checkpointing == mode
        train_loop(cfg, rt, model, mcfg, seqs, pad_id=0)
        runs[mode] = _adapters(model)
    for name, x in runs["none"].items():
        torch.testing.assert_close(runs["selective"][name], x, rtol=0, atol=0, msg=name)


def test_metrics_time_training_steps_only(tmp_path):
    """tokens/s and the ETA count the training steps this process ran, not the evaluations between them: a slow
    evaluation leaves train_s well under the wall time and the rate is each window's own."""
    import time

    seqs = synthetic_sequences(16)
    cfg = base_cfg(tmp_path / "run", micro_batch=2, grad_accum=1, max_steps=6, log_every=2, eval_every=2)

    def slow_eval(model):
        time.sleep(0.5)
        return {"weighted_f1": 0.5}

    t0 = time.perf_counter()
    _run(cfg, seqs, evaluator=slow_eval)
    wall = time.perf_counter() - t0
    records = [r for r in map(json.loads, open(os.path.join(cfg.out_dir, "metrics.jsonl"))) if "loss" in r]
    assert [r["step"] for r in records] == [2, 4, 6]
    assert records[-1]["train_s"] < wall - 1.4  # three evaluations of 0.5 s are not training time
    assert records[-1]["eta_s"] == 0
    per_step = records[0]["train_s"] / 2
    assert records[0]["eta_s"] == pytest.approx(per_step * 4)  # 4 steps left at the mean step time so far
    tokens = [r["tokens"] for r in records]
    assert tokens == sorted(tokens) and tokens[0] > 0
    # the first window's rate is its own tokens over its own seconds
    assert records[0]["tokens_per_s"] == pytest.approx(tokens[0] / records[0]["train_s"])
