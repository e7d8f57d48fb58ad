"""scripts/erc_full_run.py's bookkeeping on hand-made arms: the four rows per scored corpus, best_by_dev chosen on
dev only (calibration compared on its own out-of-fold numbers), the spread over seeds, arm names, and an epoch
counted from the leak-filtered training data."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.engine.test_erc_levers_script import _load_script

full = _load_script("erc_full_run")
DEMO_MELD = Path(__file__).resolve().parents[2] / "llama_erc" / "demo" / "meld_format"
LAUNCH = {"machine": {"cpu": "launch-cpu"}, "git": {"commit": "c0", "dirty": False}}


def _scores(acc: float, wf1: float, mf1: float, prefix: str = "") -> dict:
    return {prefix + "accuracy": acc, prefix + "weighted_f1": wf1, prefix + "macro_f1": mf1}


def _arm(root: Path, dataset: str, system: str, seed: int, *, dev: float, oof: tuple[float, float], test: float,
         test_cal: float, best_step: int = 4) -> None:
    """An arm as erc_full_run leaves it: the best dev evaluation, the training log and one test report per
    scored corpus (oof: the calibration's out-of-fold dev weighted F1 at strength 0 and at the chosen 0.5)."""
    cell = root / dataset / system / f"seed{seed}"
    (cell / "lora" / "best").mkdir(parents=True)
    (cell / "lora" / "config.json").write_text(json.dumps({"epochs": full.split_epochs(system)[1] or 1}))
    kinds = full.scored_corpora(dataset)
    metrics = {k: v for kind in kinds for k, v in _scores(dev + 0.1, dev, dev - 0.1, f"{kind}_").items()}
    (cell / "lora" / "best" / "config.json").write_text(json.dumps(
        {"step": best_step, "metrics": metrics, "leak": {"dropped_dialogues": 3} if dataset == "joint" else None}))
    (cell / "lora" / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in (
        {"step": 4, "loss": 1.0, "tokens": 10}, {"step": 4, "eval": {"weighted_f1": dev}},
        {"step": 8, "loss": 0.5, "tokens": 20})) + "\n")
    (cell / "train.log").write_text("step 8/8 | loss 0.5\ndone at step 8\n")
    per_class = {"a": {"f1": 0.25}, "b": {"f1": 0.75}}
    for kind in kinds:
        (cell / f"eval_test_{kind}").mkdir()
        report = {**_scores(0.5, test_cal, 0.3), "per_class": per_class,
                  "uncalibrated": {**_scores(0.6, test, 0.2), "per_class": per_class},
                  "calibration": {"metric": "weighted_f1", "temperature": 1.1,
                                  "strength": {"weighted_f1": 0.5, "macro_f1": 1.0},
                                  "fit": {"out_of_fold": {
                                      "weighted_f1": {"0.0": oof[0], "0.5": oof[1], "1.0": 0.0},
                                      "macro_f1": {"0.0": 0.1, "0.5": 0.2, "1.0": 0.3}}}}}
        (cell / f"eval_test_{kind}" / "report.json").write_text(json.dumps(report))


def test_arm_rows(tmp_path):
    _arm(tmp_path, "meld", "baseline", 0, dev=0.40, oof=(0.38, 0.42), test=0.50, test_cal=0.52)
    rows = full.arm_rows(("meld", "baseline", 0), tmp_path)
    assert [(r["split"], r["calibration"], r["weighted_f1"]) for r in rows] == [
        ("dev", "none", 40.0), ("dev", "prior-shift", 42.0), ("test", "none", 50.0), ("test", "prior-shift", 52.0)]
    assert rows[1]["macro_f1"] == 20.0 and rows[1]["as_trained_same_weighting"]["weighted_f1"] == 38.0
    assert all(r["train_steps"] == 8 and r["best_step"] == 4 and r["seed"] == 0 and r["epochs"] == 1 for r in rows)
    assert rows[2]["per_label_f1"] == {"a": 25.0, "b": 75.0} and rows[3]["strength"] == 0.5
    assert full.arm_rows(("meld", "retrieval", 0), tmp_path) == []


def test_joint_arm_scores_each_corpus_and_records_its_leak(tmp_path):
    _arm(tmp_path, "joint", "baseline", 1, dev=0.40, oof=(0.38, 0.42), test=0.50, test_cal=0.52)
    rows = full.arm_rows(("joint", "baseline", 1), tmp_path)
    assert [r["dataset"] for r in rows] == ["meld"] * 4 + ["emorynlp"] * 4
    assert all(r["trained_on"] == "joint" for r in rows)
    assert full.leak_of(("joint", "baseline", 1), tmp_path) == {"dropped_dialogues": 3}
    (tmp_path / "joint" / "baseline" / "seed1" / "eval_test_emorynlp" / "report.json").unlink()
    assert full.arm_rows(("joint", "baseline", 1), tmp_path) == []  # an arm counts once every corpus is scored


def test_best_by_dev_never_reads_test(tmp_path):
    # retrieval wins test by far but loses dev; calibration wins the baseline's out-of-fold comparison
    for seed, dev in ((0, 0.40), (1, 0.44)):
        _arm(tmp_path, "meld", "baseline", seed, dev=dev, oof=(0.38, 0.40 + seed / 100), test=0.5, test_cal=0.5)
        _arm(tmp_path, "meld", "retrieval", seed, dev=dev, oof=(0.30, 0.31), test=0.9, test_cal=0.9)
    rows = [r for s in ("baseline", "retrieval") for seed in (0, 1) for r in full.arm_rows(("meld", s, seed), tmp_path)]
    assert full.best_by_dev(rows) == {"meld": {"arm": "meld/baseline", "calibration": "prior-shift",
                                               "dev_weighted_f1": 40.5}}
    _arm(tmp_path, "emorynlp", "baseline", 0, dev=0.3, oof=(0.35, 0.33), test=0.5, test_cal=0.5)
    rows += full.arm_rows(("emorynlp", "baseline", 0), tmp_path)
    assert full.best_by_dev(rows)["emorynlp"]["calibration"] == "none"  # calibration lost out of fold


def test_spread_over_seeds(tmp_path):
    for seed, test in ((0, 0.50), (1, 0.54)):
        _arm(tmp_path, "meld", "baseline", seed, dev=0.4, oof=(0.38, 0.42), test=test, test_cal=0.52)
    rows = [r for seed in (0, 1) for r in full.arm_rows(("meld", "baseline", seed), tmp_path)]
    entry = next(e for e in full.spread(rows) if e["split"] == "test" and e["calibration"] == "none")
    assert entry["seeds"] == [0, 1]
    assert entry["weighted_f1"] == {"mean": 52.0, "min": 50.0, "max": 54.0, "sd": 2.0}


def test_arm_names_are_checked_before_any_work():
    assert full.parse_arm("joint/retrieval+history-5/1") == ("joint", "retrieval+history-5", 1)
    assert full.parse_arm("emorynlp/history-5@3ep/0") == ("emorynlp", "history-5@3ep", 0)
    for bad, match in (("meld/baseline", "DATASET/SYSTEM/SEED"), ("iemocap/baseline/0", "unknown dataset"),
                       ("meld/baseline/x", "DATASET/SYSTEM/SEED"), ("meld/history-7/0", "unknown system"),
                       ("meld/history-7@2ep/0", "unknown system"), ("meld/baseline@2/0", "@Nep"),
                       ("meld/baseline@0ep/0", "@Nep"), ("meld/baseline@xep/0", "@Nep")):
        with pytest.raises(SystemExit, match=match):
            full.parse_arm(bad)


def test_an_epoch_is_counted_from_the_training_data(tmp_path):
    import argparse

    from llama_erc.data import load_dialogues

    (tmp_path / "meld").symlink_to(DEMO_MELD)
    a = argparse.Namespace(data_root=tmp_path, micro_batch=4, evals_per_epoch=2, dtype="auto", max_len=256,
                           lr=1e-3, epochs=2, eval_batch=8)
    cmd = full.train_command(("meld", "baseline", 0), a, "model.gguf", Path("runs/x"))
    n = sum(len(d.utterances) for d in load_dialogues("meld", DEMO_MELD, "train"))
    steps_per_epoch = -(-n // 4)  # ceil
    assert cmd[cmd.index("--eval_every") + 1] == str(-(-steps_per_epoch // 2))
    assert cmd[cmd.index("--epochs") + 1] == "2" and cmd[cmd.index("--dtype") + 1] == "auto"
    assert full.specs("joint", tmp_path)[0].startswith("meld=")
    # an arm that names its budget trains that many epochs, its dev evaluations still counted per epoch
    cmd = full.train_command(("meld", "retrieval@3ep", 0), a, "model.gguf", Path("runs/x"))
    assert cmd[cmd.index("--epochs") + 1] == "3" and cmd[cmd.index("--retrieval") + 1] == "tfidf"
    assert cmd[cmd.index("--eval_every") + 1] == str(-(-steps_per_epoch // 2))


def test_an_arm_longer_trained_is_its_own_system_and_a_budget_mismatch_stops_before_training(tmp_path):
    import argparse

    _arm(tmp_path, "emorynlp", "baseline", 0, dev=0.38, oof=(0.37, 0.38), test=0.34, test_cal=0.34)
    _arm(tmp_path, "emorynlp", "baseline@2ep", 0, dev=0.40, oof=(0.39, 0.41), test=0.36, test_cal=0.35)
    rows = [r for system in ("baseline", "baseline@2ep") for r in full.arm_rows(("emorynlp", system, 0), tmp_path)]
    assert sorted({(r["system"], r["epochs"]) for r in rows}) == [("baseline", 1), ("baseline@2ep", 2)]
    assert full.best_by_dev(rows)["emorynlp"] == {"arm": "emorynlp/baseline@2ep", "calibration": "prior-shift",
                                                  "dev_weighted_f1": 41.0}
    assert len(full.spread(rows)) == 8  # two systems x (dev, test) x (as trained, calibrated)
    # a directory trained at 1 epoch is not resumed or re-read as a 2-epoch arm (--epochs 2 on an unnamed budget)
    a = argparse.Namespace(out=tmp_path, data_root=tmp_path, epochs=2, micro_batch=16, evals_per_epoch=2,
                           dtype="auto", max_len=512, lr=1e-3, eval_batch=16)
    with pytest.raises(SystemExit, match="trained for 1 epochs, but this arm asks for 2"):
        full.check_budget(("emorynlp", "baseline", 0), a)


def test_finished_reads_the_last_words_of_train_log(tmp_path):
    assert not full._finished(tmp_path)
    (tmp_path / "train.log").write_text("done at step 5 (interrupted; resume with --resume)\n")
    assert not full._finished(tmp_path)
    (tmp_path / "train.log").write_text("step 8/8\ndone at step 8\n")
    assert full._finished(tmp_path)


def test_collect_keeps_the_arms_of_earlier_invocations(tmp_path):
    import argparse

    # an earlier invocation (another machine) finished meld/baseline/0 and emorynlp/baseline/0; only emorynlp's
    # directory is here, rerun: its rows are replaced, meld's are kept with where they ran
    _arm(tmp_path / "runs", "meld", "baseline", 0, dev=0.40, oof=(0.38, 0.42), test=0.50, test_cal=0.52)
    _arm(tmp_path / "runs", "emorynlp", "baseline", 0, dev=0.30, oof=(0.28, 0.29), test=0.31, test_cal=0.32)
    old_rows = full.arm_rows(("meld", "baseline", 0), tmp_path / "runs") + [
        {**r, "weighted_f1": 1.0} for r in full.arm_rows(("emorynlp", "baseline", 0), tmp_path / "runs")]
    out_json = tmp_path / "results.json"
    out_json.write_text(json.dumps({"date": "2026-12-05", "git": {"commit": "abc"}, "machine": {"cpu": "x"},
                                    "rows": old_rows, "commands": {"meld/baseline/0": {"train": "t"}}}))
    import shutil
    shutil.rmtree(tmp_path / "runs" / "meld")
    a = argparse.Namespace(out=tmp_path / "runs", out_json=out_json, notes=tmp_path / "none.json", epochs=1,
                           micro_batch=16, evals_per_epoch=2, lr=1e-3, max_len=512, dtype="auto")
    result = full.collect(a, {}, 0.0, LAUNCH)
    assert result["arms_run"] == ["emorynlp/baseline/0", "meld/baseline/0"]
    assert result["arms_from_earlier_invocations"] == {"meld/baseline/0": {"date": "2026-12-05", "commit": "abc",
                                                                            "cpu": "x"}}
    assert [r["weighted_f1"] for r in result["rows"] if r["dataset"] == "meld"] == [40.0, 42.0, 50.0, 52.0]
    assert 1.0 not in [r["weighted_f1"] for r in result["rows"]]  # the rerun arm's old rows are gone
    assert result["commands"]["meld/baseline/0"] == {"train": "t"}
    assert result["best_by_dev"]["meld"]["arm"] == "meld/baseline"
    # the machine and git state are the invocation's at launch, not re-read at each write of the results file
    assert (result["machine"], result["git"]) == (LAUNCH["machine"], LAUNCH["git"])


def test_collect_keeps_the_provenance_of_arms_an_earlier_invocation_ran_in_the_same_runs_dir(tmp_path):
    import argparse

    # invocation 1 (commit "abc") ran meld/baseline/0; invocation 2 runs emorynlp/baseline/0 beside it in the same
    # runs/: meld's rows are re-read unchanged, so meld still ran at "abc", not at invocation 2's commit
    _arm(tmp_path / "runs", "meld", "baseline", 0, dev=0.40, oof=(0.38, 0.42), test=0.50, test_cal=0.52)
    out_json = tmp_path / "results.json"
    out_json.write_text(json.dumps({"date": "2026-12-05", "git": {"commit": "abc"}, "machine": {"cpu": "x"},
                                    "rows": full.arm_rows(("meld", "baseline", 0), tmp_path / "runs")}))
    _arm(tmp_path / "runs", "emorynlp", "baseline", 0, dev=0.30, oof=(0.28, 0.29), test=0.31, test_cal=0.32)
    a = argparse.Namespace(out=tmp_path / "runs", out_json=out_json, notes=tmp_path / "none.json", epochs=1,
                           micro_batch=16, evals_per_epoch=2, lr=1e-3, max_len=512, dtype="auto")
    here = {"emorynlp/baseline/0": {"train": "t"}}
    abc = {"meld/baseline/0": {"date": "2026-12-05", "commit": "abc", "cpu": "x"}}
    assert full.collect(a, here, 0.0, LAUNCH)["arms_from_earlier_invocations"] == abc
    # collecting again in the same invocation (after every arm) does not turn its own arm into an earlier one
    assert full.collect(a, here, 0.0, LAUNCH)["arms_from_earlier_invocations"] == abc
    # meld rerun here (its directory replaced, new scores): its rows and its provenance are this invocation's
    import shutil
    shutil.rmtree(tmp_path / "runs" / "meld")
    _arm(tmp_path / "runs", "meld", "baseline", 0, dev=0.41, oof=(0.38, 0.42), test=0.50, test_cal=0.52)
    assert full.collect(a, here, 0.0, LAUNCH)["arms_from_earlier_invocations"] == {}


def test_git_state_leaves_the_studys_own_results_file_out_of_dirty(tmp_path):
    import subprocess

    # a study rewrites its results JSON after every arm: the next write must not read that as uncommitted work,
    # while a change to any other tracked file still counts
    common = _load_script("run_common")
    repo = tmp_path / "repo"
    (repo / "results").mkdir(parents=True)
    (repo / "results" / "study.json").write_text("{}\n")
    (repo / "code.py").write_text("x = 1\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo)]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(git + ["add", "."], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "c"], check=True)
    own = (repo / "results" / "study.json",)
    assert common.git_state(own, root=repo)["dirty"] is False
    (repo / "results" / "study.json").write_text('{"rows": []}\n')
    assert common.git_state(own, root=repo)["dirty"] is False
    assert common.git_state((), root=repo)["dirty"] is True
    (repo / "code.py").write_text("x = 2\n")
    assert common.git_state(own, root=repo)["dirty"] is True
