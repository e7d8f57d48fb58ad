"""Resume and configuration: elastic resume (same global batch, other make-up), DDP stops together, crash-safe
checkpoints and best/, changed data refused, --knowledge and --config validated, out_dir spelled freely."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import train as train_script
from llama_erc.engine.checkpoint import list_checkpoints, save_checkpoint
from llama_erc.engine.config import EvalConfig, TrainConfig, parse_config
from llama_erc.demo import DEMO_DATA
from llama_erc.engine.loop import train_loop

from tests.engine.helpers import base_cfg, synthetic_sequences, tiny_setup
from tests.engine.resume_worker import N_EXAMPLES, RUN, WATCHDOG_S

TORCHRUN_TIMEOUT_S = 300  # ~10 s idle, ~60 s on a busy 2-core box; a hang fails the test instead of blocking CI


def _run(cfg, seqs=None, evaluator=None):
    rt, model, mcfg = tiny_setup(cfg)
    state = train_loop(cfg, rt, model, mcfg, seqs or synthetic_sequences(N_EXAMPLES), pad_id=0, evaluator=evaluator)
    return state, model


def _adapters(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _losses(out_dir):
    return [r["loss"] for r in map(json.loads, open(Path(out_dir) / "metrics.jsonl")) if "loss" in r]


def _assert_same_adapters(got: dict, want: dict, exact: bool = False):
    assert set(got) == set(want)
    for name, x in want.items():
        if exact:
            assert torch.equal(got[name], x), name
        else:  # other processes, other summation order (see helpers.ADAM_EPS)
            torch.testing.assert_close(got[name], x, rtol=1e-5, atol=1e-7, msg=name)


def _torchrun(mode: str, root: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    worker = Path(__file__).with_name("resume_worker.py")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(worker), mode, str(root)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=TORCHRUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:  # the workers' watchdog (WATCHDOG_S) should have ended them already
        os.killpg(proc.pid, signal.SIGTERM)  # torchrun passes it on to the workers, in their own sessions
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        pytest.fail(f"torchrun {mode} hung (killed after {TORCHRUN_TIMEOUT_S} s):\n{out[-3000:]}")
    assert proc.returncode == 0, f"torchrun {mode} failed (a hang ends at the {WATCHDOG_S} s watchdog):\n{out[-4000:]}"
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: one process, micro_batch 2 x grad_accum 2 (global batch 4), 4 steps."""
    cfg = base_cfg(tmp_path_factory.mktemp("reference"), grad_accum=2, **RUN)
    _, model = _run(cfg)
    return _adapters(model), _losses(cfg.out_dir)


def _sigterm_at_eval(model):
    os.kill(os.getpid(), signal.SIGTERM)
    return {"weighted_f1": 0.5}


# 1. the global batch --------------------------------------------------------------------------------------------

def test_resume_on_two_processes_keeps_the_global_batch(tmp_path, reference):
    """1 process x grad_accum 2, stopped at step 2; on 2 processes the same flags (global batch 8) are refused,
    2 processes x grad_accum 1 continue and end where the uninterrupted run does."""
    cfg = base_cfg(tmp_path, grad_accum=2, eval_every=2, **RUN)
    state, _ = _run(cfg, evaluator=_sigterm_at_eval)
    assert state["step"] == 2 and state.get("interrupted")
    out = _torchrun("elastic", tmp_path)
    assert "the global batch changed from 4" in out and "to 8" in out, out[-3000:]
    final = list_checkpoints(cfg.out_dir)[-1]
    assert final.name == "step_0000004"
    _assert_same_adapters(load_file(str(final / "adapters.safetensors")), reference[0])
    assert _losses(cfg.out_dir) == pytest.approx(reference[1], rel=1e-5)


def test_resume_with_another_global_batch_names_it(tmp_path):
    _run(base_cfg(tmp_path, grad_accum=2, **{**RUN, "max_steps": 1}))
    with pytest.raises(ValueError, match=r"global batch changed from 4 \(micro_batch 2 x grad_accum 2 x 1 process\) "
                                         r"to 2 \(micro_batch 2 x grad_accum 1 x 1 process\)"):
        _run(base_cfg(tmp_path, grad_accum=1, resume=True, **{**RUN, "max_steps": 1}))
    state, _ = _run(base_cfg(tmp_path, grad_accum=1, resume=True, **{**RUN, "max_steps": 1, "micro_batch": 4}))
    assert state["step"] == 1  # micro_batch 4 x grad_accum 1: the same global batch, accepted


def test_checkpoint_without_batch_and_data_records_still_resumes(tmp_path, capsys):
    """Written before the records existed: resumable with its own make-up, with warnings; not another make-up."""
    kw = {**RUN, "grad_accum": 2, "max_steps": 1}
    _run(base_cfg(tmp_path, **kw))
    ckpt = list_checkpoints(tmp_path / "run")[-1]
    saved = json.loads((ckpt / "config.json").read_text())
    del saved["batch"], saved["data"]
    (ckpt / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="micro_batch: checkpoint 2 vs now 4"):
        _run(base_cfg(tmp_path, resume=True, **{**kw, "grad_accum": 1, "micro_batch": 4}))
    capsys.readouterr()
    state, _ = _run(base_cfg(tmp_path, resume=True, **kw))
    assert state["step"] == 1 and capsys.readouterr().out.count("warning") == 2


# 5. a stop signal under DDP ------------------------------------------------------------------------------------

def test_sigterm_to_one_ddp_rank_stops_both_with_one_checkpoint(tmp_path, reference):
    """SIGTERM reaches rank 1 only, during step 2: both ranks finish step 2, rank 0 saves it, both exit 0; the
    resume (here on one process, the same global batch) ends where the uninterrupted run does."""
    _torchrun("sigterm", tmp_path)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_0000002"]
    state, model = _run(base_cfg(tmp_path, grad_accum=2, resume=True, **RUN))
    assert state["step"] == 4
    _assert_same_adapters(_adapters(model), reference[0])


# 6. crash safety -----------------------------------------------------------------------------------------------

def test_checkpoint_is_fsynced_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    stale = tmp_path / "checkpoints" / ".step_0000003.tmp-99999"
    stale.mkdir(parents=True)
    (stale / "adapters.safetensors").write_bytes(b"")
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, **kw):
        events.append(("replace", os.path.realpath(src), os.path.realpath(dst)))
        return real_replace(src, dst, **kw)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    model = nn.Linear(3, 2)
    final = save_checkpoint(tmp_path, model=model, opt=torch.optim.AdamW(model.parameters()),
                            state={"step": 7, "rng": {}}, config={"train": {}}, keep_last=1)
    final = os.path.realpath(final)
    rename = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == final)
    tmp = events[rename][1]
    synced = {e[1] for e in events[:rename] if e[0] == "fsync"}
    files = ("adapters.safetensors", "optimizer.pt", "state.pt", "config.json")
    assert {os.path.join(tmp, f) for f in files} | {tmp} <= synced
    assert ("fsync", os.path.dirname(final)) in events[rename + 1:]  # the rename itself is durable
    assert not stale.exists()


def test_resume_falls_back_past_damaged_checkpoints(tmp_path, reference, capsys):
    """Power loss after the rename, before the data reached the disk: an empty state.pt (step 4), a truncated
    adapters file (step 3). The resume warns, uses step 2 and ends bit-identical to the uninterrupted run."""
    kw = {**RUN, "grad_accum": 2, "save_every": 1, "keep_last": 3}
    _run(base_cfg(tmp_path, **kw))
    ckpts = tmp_path / "run" / "checkpoints"
    (ckpts / "step_0000004" / "state.pt").write_bytes(b"")
    adapters = ckpts / "step_0000003" / "adapters.safetensors"
    adapters.write_bytes(adapters.read_bytes()[: adapters.stat().st_size // 2])
    (ckpts / ".step_0000005.tmp-4242").mkdir()
    capsys.readouterr()
    state, model = _run(base_cfg(tmp_path, resume=True, **kw))
    log = capsys.readouterr().out
    assert "step_0000004" in log and "step_0000003" in log and "warning" in log
    assert "resumed from" in log and "step 2" in log
    assert state["step"] == 4
    _assert_same_adapters(_adapters(model), reference[0], exact=True)
    assert not (ckpts / ".step_0000005.tmp-4242").exists()


class _Unwritable:
    def __str__(self):  # stands for a write of best/config.json that fails after the adapters were written
        raise RuntimeError("disk full")


def test_best_adapters_and_config_change_together(tmp_path):
    calls = []

    def evaluator(model):
        calls.append(1)
        return {"weighted_f1": 0.5} if len(calls) == 1 else {"weighted_f1": 0.9, "detail": _Unwritable()}
    with pytest.raises(RuntimeError, match="disk full"):
        _run(base_cfg(tmp_path, **{**RUN, "grad_accum": 2, "eval_every": 2, "save_every": 2}), evaluator=evaluator)
    best = tmp_path / "run" / "best"
    assert json.loads((best / "config.json").read_text())["step"] == 2
    _assert_same_adapters(load_file(str(best / "adapters.safetensors")),
                          load_file(str(tmp_path / "run" / "checkpoints" / "step_0000002" / "adapters.safetensors")),
                          exact=True)


# 3. out_dir -----------------------------------------------------------------------------------------------------

def test_resume_accepts_another_spelling_or_place_of_out_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    kw = {**RUN, "grad_accum": 2, "max_steps": 2, "eval_every": 1}
    state, _ = _run(base_cfg(tmp_path, out_dir="runs/x", **kw), evaluator=_sigterm_at_eval)
    assert state["step"] == 1
    state, _ = _run(base_cfg(tmp_path, out_dir="./runs/x", resume=True, **kw))
    assert state["step"] == 2
    shutil.move(tmp_path / "runs" / "x", tmp_path / "moved")
    state, _ = _run(base_cfg(tmp_path, out_dir=str(tmp_path / "moved"), resume=True, **kw))
    assert state["step"] == 2 and (tmp_path / "moved" / "best" / "adapters.safetensors").is_file()


# 2. --knowledge ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["knowledge.csv", "MELD=k.csv", "meld:k.csv", "emorynlp=k.csv", "meld=",
                                  "meld=k.txt", "prompts=k.jsonl"])
def test_malformed_knowledge_spec_is_refused(spec):
    with pytest.raises(ValueError, match="knowledge spec"):
        TrainConfig(train_data=("meld=/d", "prompts=/p.jsonl"), dev_data=("iemocap=/i",), knowledge=(spec,))
    with pytest.raises(ValueError, match="knowledge spec"):
        EvalConfig(data=("meld=/d",), knowledge=(spec,))


def test_knowledge_spec_for_a_train_or_dev_kind_is_accepted():
    cfg = TrainConfig(train_data=("meld=/d",), dev_data=("iemocap=/i",), knowledge=("meld=k.csv", "iemocap=k.jsonl"))
    assert len(cfg.knowledge) == 2


def test_malformed_knowledge_fails_before_anything_loads(tmp_path, capsys):
    argv = ["--train_data", "meld=/nonexistent", "--knowledge", "MELD=/k.csv", "--out_dir", str(tmp_path / "r")]
    assert train_script.main(argv) == 2
    assert "knowledge spec 'MELD=/k.csv'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


# 4. --config ------------------------------------------------------------------------------------------------------

def test_config_file_takes_natural_json_types(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"context_turns": 2, "lr": 1, "micro_batch": 4, "packing": True,
                                "lora_targets": ["wq", "wk"], "train_data": "meld=/a,emorynlp=/b"}))
    cfg = parse_config(TrainConfig, ["--config", str(path)])
    assert cfg.context_turns == "2" and cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.micro_batch == 4
    assert cfg.packing is True and cfg.lora_targets == ("wq", "wk") and cfg.train_data == ("meld=/a", "emorynlp=/b")
    assert parse_config(TrainConfig, ["--config", str(path), "--context_turns", "all"]).context_turns == "all"


@pytest.mark.parametrize("key, value", [("context_turns", True), ("context_turns", 1.5), ("lr", "fast"),
                                        ("micro_batch", 2.5), ("packing", "yes"), ("lora_targets", [1]),
                                        ("model", 7), ("epochs", None)])
def test_config_file_wrong_type_is_a_named_error(tmp_path, capsys, key, value):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({key: value}))
    assert train_script.main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"'{key}' must be" in err and str(path) in err


# 7. changed data ----------------------------------------------------------------------------------------------------

def test_resume_on_changed_training_data_is_refused(tmp_path, demo_tokenizer, capsys):
    data = tmp_path / "meld"
    shutil.copytree(DEMO_DATA, data)
    argv = ["--model", "tiny", "--tokenizer", demo_tokenizer, "--train_data", f"meld={data}", "--out_dir",
            str(tmp_path / "run"), "--dtype", "fp32", "--device", "cpu", "--kernels", "off", "--micro_batch", "4",
            "--grad_accum", "1", "--max_steps", "1", "--activation_checkpointing", "none"]
    assert train_script.main(argv) == 0
    assert train_script.main(argv + ["--resume"]) == 0  # the same data
    csv = data / "train_sent_emo.csv"
    csv.write_text(csv.read_text().replace("revolting", "wonderful", 1))
    capsys.readouterr()
    assert train_script.main(argv + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert "the training data of meld changed" in err and "examples, sha256" in err


def test_resume_on_a_quantized_base_is_exact(tmp_path):
    """--base_quant nf4: 2 steps, stop, resume to 4 gives the adapters and losses of 4 uninterrupted steps."""
    kw = {**RUN, "grad_accum": 2, "base_quant": "nf4"}
    _, whole = _run(base_cfg(tmp_path / "whole", **kw))
    split = base_cfg(tmp_path / "split", eval_every=2, **kw)
    state, _ = _run(split, evaluator=_sigterm_at_eval)  # stops after step 2's evaluation, with a checkpoint
    assert state["step"] == 2 and state.get("interrupted")
    with pytest.raises(ValueError, match="base_quant"):  # the packed base is part of the run: no switching
        _run(base_cfg(tmp_path / "split", eval_every=2, resume=True, **{**kw, "base_quant": "none"}))
    _, resumed = _run(base_cfg(tmp_path / "split", eval_every=2, resume=True, **kw))
    _assert_same_adapters(_adapters(resumed), _adapters(whole), exact=True)
    assert _losses(split.out_dir) == _losses(base_cfg(tmp_path / "whole", **kw).out_dir)
