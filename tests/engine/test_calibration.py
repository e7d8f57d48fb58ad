"""Dev-calibrated label priors (engine/calibration.py): the fast F1 twins, the in-sample search (dev-insample), the
out-of-sample prior-shift fit (cross-fitted by dialogue, dev reweighted to train's label mix), storage, eval.py."""
from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import f1_score

from llama_erc.demo import DEMO_DATA
from llama_erc.engine import calibration
from llama_erc.engine.calibration import (CALIBRATION_FILE, OFFSET_GRID, dialogue_folds, f1_scores, fit_calibration,
                                          fit_prior_shift, read_calibrations, weighted_f1, write_calibration)

LABELS = ("neutral", "joy", "anger")
MELD = f"meld={DEMO_DATA}"


def _tiny_run(tmp_path, tokenizer: str):
    """A tiny model's adapters after 2 LoRA steps on the demo set (train.py), for eval.py to calibrate."""
    import train as train_script
    run = tmp_path / "run"
    assert train_script.main(["--model", "tiny", "--tokenizer", tokenizer, "--train_data", MELD, "--out_dir", str(run),
                              "--dtype", "fp32", "--device", "cpu", "--kernels", "off", "--micro_batch", "4",
                              "--grad_accum", "1", "--max_steps", "2", "--save_every", "2"]) == 0
    return run


def test_weighted_f1_matches_sklearn():
    rng = np.random.default_rng(0)
    for n_classes in (2, 3, 7):
        for _ in range(20):
            gold = rng.integers(0, n_classes, 50)
            pred = rng.integers(0, n_classes - 1, 50)  # one class never predicted: zero_division path
            want = f1_score(gold, pred, labels=list(range(n_classes)), average="weighted", zero_division=0)
            assert weighted_f1(gold, pred, n_classes) == pytest.approx(want, abs=1e-12)


def _biased_scores(n: int = 600, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A classifier that knows the class but over-weights 'neutral' by 1.5 nats."""
    rng = np.random.default_rng(seed)
    gold = rng.choice(3, size=n, p=[0.5, 0.3, 0.2])
    logits = rng.normal(0, 1.0, (n, 3))
    logits[np.arange(n), gold] += 1.5
    logits[:, 0] += 1.5
    log_probs = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    return log_probs, gold


def test_fit_removes_a_majority_bias_and_never_lowers_dev_f1():
    lp, gold = _biased_scores()
    cal = fit_calibration(lp, gold, LABELS, "toy")
    assert cal.dev_after["weighted_f1"] > cal.dev_before["weighted_f1"] + 0.02
    # the learned offsets push neutral down relative to the others
    assert cal.offsets[0] < min(cal.offsets[1:])
    assert all(v in OFFSET_GRID for v in cal.offsets)
    # predict() is argmax(log p + b), and its dev score is the recorded one
    pred = cal.predict(lp)
    np.testing.assert_array_equal(pred, np.argmax(lp + np.array(cal.offsets), 1))
    assert weighted_f1(gold, pred, 3) == pytest.approx(cal.dev_after["weighted_f1"])
    # deterministic: the same data gives the same offsets
    assert fit_calibration(lp, gold, LABELS, "toy").offsets == cal.offsets


def test_fit_is_a_coordinate_optimum():
    """No single offset moved to any grid value raises dev weighted F1 further."""
    lp, gold = _biased_scores(seed=3)
    cal = fit_calibration(lp, gold, LABELS, "toy")
    best = cal.dev_after["weighted_f1"]
    for k in range(3):
        for v in OFFSET_GRID:
            trial = np.array(cal.offsets)
            trial[k] = v
            assert weighted_f1(gold, np.argmax(lp + trial, 1), 3) <= best + 1e-12


def test_unbiased_scores_keep_zero_offsets():
    """Perfect predictions: nothing can improve, so the offsets stay at 0 (ties never move them)."""
    gold = np.array([0, 1, 2, 0, 1, 2])
    lp = np.log(np.full((6, 3), 0.1))
    lp[np.arange(6), gold] = np.log(0.8)
    cal = fit_calibration(lp, gold, LABELS, "toy")
    assert cal.offsets == (0.0, 0.0, 0.0) and cal.dev_after == cal.dev_before


def test_storage_round_trip_keyed_by_dataset(tmp_path):
    lp, gold = _biased_scores()
    a = fit_calibration(lp, gold, LABELS, "meld")
    b = fit_calibration(lp[:300], gold[:300], LABELS, "emorynlp")
    assert read_calibrations(tmp_path) == {}
    write_calibration(tmp_path, a)
    write_calibration(tmp_path, b)
    got = read_calibrations(tmp_path)
    assert got == {"meld": a, "emorynlp": b}
    assert set(json.loads((tmp_path / CALIBRATION_FILE).read_text())) == {"meld", "emorynlp"}


def test_bad_inputs_are_named(tmp_path):
    lp, gold = _biased_scores()
    with pytest.raises(ValueError, match="2 labels"):
        fit_calibration(lp, gold, LABELS[:2], "toy")
    cal = fit_calibration(lp, gold, LABELS, "toy")
    with pytest.raises(ValueError, match="toy has 3 labels"):
        cal.predict(lp[:, :2])
    (tmp_path / CALIBRATION_FILE).write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a calibration file"):
        read_calibrations(tmp_path)


def test_eval_calibration_dev_end_to_end(tmp_path, demo_tokenizer, capsys):
    """eval.py --calibration dev-insample: fits on dev once, stores beside the adapters, applies argmax(log p + b)
    to the evaluated split, reports both; a second evaluation reads the stored offsets and gives the same report."""
    import csv

    import eval as eval_script

    run = _tiny_run(tmp_path, demo_tokenizer)
    common = ["--run", str(run), "--data", MELD, "--split", "test", "--dtype", "fp32", "--device", "cpu",
              "--kernels", "off", "--calibration", "dev-insample"]
    assert eval_script.main(common + ["--out_dir", str(tmp_path / "e1")]) == 0
    assert "fitting meld label offsets on the dev split" in capsys.readouterr().out
    adapters_dir = run / "checkpoints" / "step_0000002"
    cal = read_calibrations(adapters_dir)["meld"]
    report = json.loads((tmp_path / "e1" / "report.json").read_text())
    assert report["calibration"]["offsets"] == list(cal.offsets) and report["calibration"]["in_sample"] is False
    assert set(report["uncalibrated"]) == {"accuracy", "weighted_f1", "macro_f1", "per_class", "confusion_matrix"}
    assert set(report["uncalibrated"]["per_class"]) == set(cal.labels)
    with (tmp_path / "e1" / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    probs = np.array([[float(r[f"p_{lab}"]) for lab in cal.labels] for r in rows])
    want = [cal.labels[i] for i in np.argmax(np.log(np.maximum(probs, 1e-300)) + np.array(cal.offsets), 1)]
    agree = np.mean([r["pred"] == w for r, w in zip(rows, want)])
    assert agree > 0.95  # the CSV's 6-decimal probabilities can flip a near tie, nothing more

    assert eval_script.main(common + ["--out_dir", str(tmp_path / "e2")]) == 0
    assert "offsets from" in capsys.readouterr().out
    again = json.loads((tmp_path / "e2" / "report.json").read_text())
    assert again["weighted_f1"] == report["weighted_f1"] and again["calibration"] == report["calibration"]


def test_eval_calibration_needs_a_run():
    import eval as eval_script
    assert eval_script.main(["--model", "tiny", "--data", "meld=x", "--calibration", "dev"]) == 2


# ---- prior-shift: fit out of sample ----------------------------------------------------------------------------

def test_f1_scores_match_sklearn_with_sample_weights():
    rng = np.random.default_rng(1)
    for n_classes in (2, 3, 7):
        for _ in range(20):
            gold = rng.integers(0, n_classes, 60)
            pred = rng.integers(0, n_classes - 1, 60)
            w = rng.uniform(0.1, 3.0, 60)
            got = f1_scores(gold, pred, n_classes, w)
            for avg in ("weighted", "macro"):
                want = f1_score(gold, pred, labels=list(range(n_classes)), average=avg, sample_weight=w,
                                zero_division=0)
                assert got[f"{avg}_f1"] == pytest.approx(want, abs=1e-12), avg


def test_dialogue_folds_keep_dialogues_whole():
    ids = ["a", "a", "b", "c", "c", "c", "d", "e", "f", "b"]
    fold = dialogue_folds(ids, 3)
    assert all(len({f for i, f in zip(ids, fold) if i == d}) == 1 for d in set(ids))
    assert fold.tolist() == [0, 0, 1, 2, 2, 2, 0, 1, 2, 1]  # dialogues dealt round-robin in order of appearance
    with pytest.raises(ValueError, match="at least 2 dev dialogues"):
        dialogue_folds(["a", "a"], 5)


def _shifted(n: int = 900, seed: int = 0):
    """A classifier calibrated to a uniform prior, scored on a uniform dev split; train has label 0 at 70%."""
    rng = np.random.default_rng(seed)
    gold = rng.integers(0, 3, n)
    logits = rng.normal(0, 1, (n, 3))
    logits[np.arange(n), gold] += 1.0
    lp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    return lp, gold, [f"d{i // 6}" for i in range(n)]


def test_prior_shift_moves_the_bias_toward_the_train_prior():
    lp, gold, ids = _shifted()
    cal = fit_prior_shift(lp, gold, ids, np.array([700, 150, 150]), LABELS, "toy", data="synthetic dev")
    assert cal.bias[0] - max(cal.bias[1:]) > 1.0  # log(700/150) = 1.54 is the prior shift
    assert cal.strength["weighted_f1"] > 0 and 0.8 < cal.temperature < 1.3
    assert cal.fit["data"] == "synthetic dev" and cal.fit["folds"] == 5 and cal.fit["fold_by"] == "dialogue"
    oof = cal.fit["out_of_fold"]["weighted_f1"]
    assert oof[str(cal.strength["weighted_f1"])] == max(oof.values()) > oof["0.0"]
    np.testing.assert_allclose(cal.offsets_for("weighted_f1"),
                               cal.strength["weighted_f1"] * cal.temperature * np.array(cal.bias))
    # no shift between train and dev: nothing to move, and the conservative strength 0 wins its ties
    same = fit_prior_shift(lp, gold, ids, np.array([300, 300, 300]), LABELS, "toy", data="synthetic dev")
    assert max(abs(b) for b in same.bias) < 0.2 and same.strength == {"weighted_f1": 0.0, "macro_f1": 0.0}


def test_prior_shift_cross_fits_no_utterance_on_itself(monkeypatch):
    """Each fold's offsets come from a fit on the other folds only; the final fit sees all of dev."""
    lp, gold, ids = _shifted(n=120)
    lp = lp.copy()
    lp[:, 2] = -np.arange(len(lp)) / 1e3 - 2.0  # a unique value per row, to tell rows apart in the fits
    seen = []
    real = calibration._fit_temperature_bias
    monkeypatch.setattr(calibration, "_fit_temperature_bias",
                        lambda x, g, w: seen.append(x[:, 2].copy()) or real(x, g, w))
    fit_prior_shift(lp, gold, ids, np.array([50, 30, 40]), LABELS, "toy", data="synthetic dev", folds=4)
    fold = dialogue_folds(ids, 4)
    assert len(seen) == 5
    for k in range(4):
        assert set(seen[k]) == set(lp[fold != k, 2]) and not set(seen[k]) & set(lp[fold == k, 2])
    assert set(seen[4]) == set(lp[:, 2])


def test_storage_keeps_the_method_and_reads_old_files(tmp_path):
    lp, gold, ids = _shifted()
    shift = fit_prior_shift(lp, gold, ids, np.array([700, 150, 150]), LABELS, "meld", data="synthetic dev")
    insample = fit_calibration(lp, gold, LABELS, "emorynlp")
    write_calibration(tmp_path, shift)
    write_calibration(tmp_path, insample)
    got = read_calibrations(tmp_path)
    assert got == {"meld": shift, "emorynlp": insample}
    assert got["meld"].method == "prior-shift" and got["emorynlp"].method == "dev-insample"
    # a file written before methods existed holds in-sample offsets
    old = {k: v for k, v in json.loads((tmp_path / CALIBRATION_FILE).read_text())["emorynlp"].items() if k != "method"}
    (tmp_path / CALIBRATION_FILE).write_text(json.dumps({"emorynlp": old}))
    assert read_calibrations(tmp_path)["emorynlp"] == insample


def test_eval_calibration_prior_shift_end_to_end(tmp_path, demo_tokenizer, capsys):
    """eval.py --calibration dev: the prior-shift fit on the dev split, stored with how it was fit; test scored
    with the strength chosen for --calibration_metric; a stored fit of the other method is replaced."""
    import eval as eval_script

    run = _tiny_run(tmp_path, demo_tokenizer)
    common = ["--run", str(run), "--data", MELD, "--split", "test", "--dtype", "fp32", "--device", "cpu",
              "--kernels", "off"]
    assert eval_script.main(common + ["--calibration", "dev-insample", "--out_dir", str(tmp_path / "e0")]) == 0
    assert eval_script.main(common + ["--calibration", "dev", "--calibration_metric", "macro_f1",
                                      "--out_dir", str(tmp_path / "e1")]) == 0
    assert "fitting meld label offsets on the dev split (113 utterances, prior-shift)" in capsys.readouterr().out
    cal = read_calibrations(run / "checkpoints" / "step_0000002")["meld"]
    report = json.loads((tmp_path / "e1" / "report.json").read_text())["calibration"]
    assert cal.method == report["method"] == "prior-shift" and report["metric"] == "macro_f1"
    assert report["applied_offsets"] == list(cal.offsets_for("macro_f1")) and report["in_sample"] is False
    assert report["fit"]["data"].startswith(f"the dev split of {MELD}") and report["fit"]["n"] == 113
    assert json.loads((tmp_path / "e1" / "report.json").read_text())["title"].endswith(
        "(dev-calibrated label priors, dev)")
