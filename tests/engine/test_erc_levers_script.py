"""scripts/erc_levers_run.py's bookkeeping on hand-made cells: the four rows of a system, train tokens, system
names (joined levers) and the choice of `best` by dev only."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def _load_script(name: str):
    """A study script as a module, by its path (scripts/ is not a package); its sibling run_common.py is found
    the way `python scripts/<name>.py` finds it, from the script's own directory."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(SCRIPTS))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPTS))
    return module


levers = _load_script("erc_levers_run")


def _scores(acc: float, wf1: float, mf1: float) -> dict:
    return {"accuracy": acc, "weighted_f1": wf1, "macro_f1": mf1}


def _cell(root: Path, dataset: str, system: str, *, dev: float, dev_cal: float, test: float, test_cal: float,
          tokens: int = 1000, warmup_tokens: int = 0) -> None:
    cell = root / dataset / system
    (cell / "lora").mkdir(parents=True)
    (cell / "lora" / "config.json").write_text(json.dumps({"max_steps": 4, "micro_batch": 5, "grad_accum": 1}))
    (cell / "lora" / "metrics.jsonl").write_text(json.dumps({"step": 2, "tokens": tokens // 2}) + "\n"
                                                 + json.dumps({"step": 4, "tokens": tokens}) + "\n")
    if warmup_tokens:
        (cell / "speaker").mkdir()
        (cell / "speaker" / "metrics.jsonl").write_text(json.dumps({"step": 1, "tokens": warmup_tokens}) + "\n")
    (cell / "eval_test").mkdir()
    report = {**_scores(0.5, test_cal, 0.2), "uncalibrated": _scores(0.6, test, 0.1),
              "calibration": {"dev_before": _scores(0.4, dev, 0.1), "dev_after": _scores(0.45, dev_cal, 0.3)}}
    (cell / "eval_test" / "report.json").write_text(json.dumps(report))


def test_cell_rows(tmp_path):
    _cell(tmp_path, "meld", "speaker-warmup", dev=0.40, dev_cal=0.45, test=0.50, test_cal=0.52, tokens=1000,
          warmup_tokens=300)
    rows = levers.cell_rows("meld", "speaker-warmup", tmp_path)
    assert [(r["system"], r["split"], r["weighted_f1"]) for r in rows] == [
        ("speaker-warmup", "dev", 40.0), ("speaker-warmup", "test", 50.0),
        ("speaker-warmup + dev calibration", "dev", 45.0), ("speaker-warmup + dev calibration", "test", 52.0)]
    assert all(r["train_tokens"] == 1300 and r["tokens_per_train_sequence"] == 50.0 for r in rows)
    assert rows[2]["in_sample"] is True and "in_sample" not in rows[3]
    assert levers.cell_rows("meld", "missing", tmp_path) == []


def test_best_is_chosen_on_dev_over_every_dataset(tmp_path):
    # "retrieval" has the best test scores but the worse dev ones; "history-5" ran on one dataset only
    _cell(tmp_path, "meld", "baseline", dev=0.40, dev_cal=0.41, test=0.50, test_cal=0.50)
    _cell(tmp_path, "emorynlp", "baseline", dev=0.20, dev_cal=0.30, test=0.20, test_cal=0.30)
    _cell(tmp_path, "meld", "retrieval", dev=0.39, dev_cal=0.40, test=0.90, test_cal=0.90)
    _cell(tmp_path, "emorynlp", "retrieval", dev=0.20, dev_cal=0.29, test=0.90, test_cal=0.90)
    _cell(tmp_path, "emorynlp", "history-5", dev=0.99, dev_cal=0.99, test=0.99, test_cal=0.99)
    rows = [r for ds in ("meld", "emorynlp") for s in ("baseline", "retrieval", "history-5")
            for r in levers.cell_rows(ds, s, tmp_path)]
    assert levers.choose_best(rows) == "baseline + dev calibration"


def test_systems_join_levers_and_unknown_names_fail():
    flags, warmup = levers.system_flags("retrieval+history-5+speaker-warmup")
    assert flags == ["--retrieval", "tfidf", "--context_turns", "5"] and warmup
    with pytest.raises(SystemExit, match="unknown system 'history-7'"):
        levers.system_flags("retrieval+history-7")


def test_recipe_dtype_follows_the_flag_auto_by_default():
    """The cell recipe takes --dtype (auto by default: an AVX2-only CPU would run a hard-coded bf16 ~13x slower)."""
    import argparse

    p = argparse.ArgumentParser()
    levers.add_recipe_args(p)
    for argv, want in (([], "auto"), (["--dtype", "fp32"], "fp32")):
        cmd = levers.recipe("model.gguf", "meld=data", Path("out"), p.parse_args(argv), steps=8)
        assert cmd[cmd.index("--dtype") + 1] == want
