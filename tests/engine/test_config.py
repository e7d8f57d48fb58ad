"""The config travels whole: TrainConfig carries the data wing's fields and derives the sub-configs once; eval's
"the run's value" defaults are resolved by one function; the run record is read back by one reader."""
import dataclasses
import json

import pytest

from llama_erc.data import DataConfig
from llama_erc.demo import DEMO_DATA
from llama_erc.engine.checkpoint import read_run_record, train_config_of
from llama_erc.engine.config import RUN_DEFAULTS, EvalConfig, TrainConfig, parse_config, resolve_run_config
from llama_erc.engine.optim import OptimConfig
from llama_erc.engine.packing import BatchLayout
from llama_erc.model import LoRAConfig

MELD = f"meld={DEMO_DATA}"


def test_every_data_field_is_a_train_flag_and_travels_as_a_data_config():
    names = [f.name for f in dataclasses.fields(DataConfig)]
    assert set(names) <= {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = parse_config(TrainConfig, ["--train_data", MELD, "--retrieval", "tfidf", "--context_turns", "5",
                                     "--max_len", "300"])
    assert cfg.data == DataConfig(train_data=(MELD,), retrieval="tfidf", context_turns="5", max_len=300)
    assert cfg.data.prompt_config().context_turns == 5 and cfg.data.prompt_config().retrieval == "tfidf"


def test_sub_configs_are_derived_from_the_flags():
    cfg = TrainConfig(lora_rank=4, lora_alpha=8.0, lora_dropout=0.1, lora_targets=("wq",), lr=1e-3, min_lr=1e-4,
                      warmup_steps=5, grad_clip=0.5, packing=True, share_prefix=True, max_len=256, micro_batch=4)
    assert cfg.lora == LoRAConfig(rank=4, alpha=8.0, dropout=0.1, targets=("wq",))
    assert cfg.optim == OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=5, grad_clip=0.5)
    assert cfg.layout == BatchLayout(packing=True, max_len=256, share_prefix=True)
    assert cfg.dev_batch_size == 4 and dataclasses.replace(cfg, eval_batch_size=16).dev_batch_size == 16
    with pytest.raises(ValueError, match="--grad_clip must be positive"):
        TrainConfig(grad_clip=0)  # checked once, by OptimConfig


def test_run_defaults_are_unset_in_eval_config():
    """Each field eval takes from the run defaults to "unset", so a value given always overrides."""
    defaults = {f.name: f.default for f in dataclasses.fields(EvalConfig)}
    assert all(defaults[name] in ("", 0, ()) for name in RUN_DEFAULTS)
    assert set(RUN_DEFAULTS) <= {f.name for f in dataclasses.fields(TrainConfig)}


def test_eval_resolves_the_run_config_in_one_place():
    run = TrainConfig(model="tiny", train_data=(MELD,), dev_data=(MELD,), knowledge=("meld=k.csv",),
                      context_turns="5", max_len=300, retrieval="tfidf", prompt_format="chat", kernels="on",
                      task="erc", aux_impact=0.1)
    rc = resolve_run_config(EvalConfig(data=(MELD,)), run)
    assert (rc.context_turns, rc.max_len, rc.retrieval, rc.prompt_format, rc.kernels, rc.knowledge) == \
        ("5", 300, "tfidf", "chat", "on", ("meld=k.csv",))
    assert rc.dev_data == (MELD,) and rc.train_data == () and rc.aux_impact == 0.0  # scored as dev data
    rc = resolve_run_config(EvalConfig(data=(MELD,), retrieval="none", max_len=128, context_turns="all"), run)
    assert (rc.retrieval, rc.max_len, rc.context_turns, rc.prompt_format) == ("none", 128, "all", "chat")
    # another corpus than the run's: the run's sidecars for other corpora do not apply
    assert resolve_run_config(EvalConfig(data=("emorynlp=x",)), run).knowledge == ()
    # no run: TrainConfig's defaults
    assert resolve_run_config(EvalConfig(data=(MELD,)), None).context_turns == TrainConfig().context_turns


def test_run_record_is_read_by_one_reader(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"train": {**dataclasses.asdict(TrainConfig(lora_rank=4)), "lora_targets": ["wq"]}}))
    cfg = train_config_of(read_run_record(path), path)
    assert cfg.lora_rank == 4 and cfg.lora_targets == ("wq",)
    path.write_text(json.dumps({"train": {"lora_rank": 4, "not_a_field": 1}}))
    with pytest.raises(ValueError, match=r"fields this version does not know: \['not_a_field'\]"):
        train_config_of(read_run_record(path), path)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a run record"):
        read_run_record(path)
    path.write_text("{")
    with pytest.raises(ValueError, match="config.json: unreadable run record"):
        read_run_record(path)
