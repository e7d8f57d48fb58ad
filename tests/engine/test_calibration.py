"""Dev-calibrated label priors (engine/calibration.py): the fast weighted F1, the coordinate-ascent fit, storage."""
from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import f1_score

from llama_erc.engine.calibration import (CALIBRATION_FILE, OFFSET_GRID, fit_calibration, read_calibrations,
                                           weighted_f1, write_calibration)

LABELS = ("neutral", "joy", "anger")


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
    """eval.py --calibration dev: fits on dev once, stores beside the adapters, applies argmax(log p + b) to the
    evaluated split, reports both; a second evaluation reads the stored offsets and gives the same report."""
    import csv

    import eval as eval_script
    import train as train_script
    from llama_erc.demo import DEMO_DATA

    meld = f"meld={DEMO_DATA}"
    run = tmp_path / "run"
    assert train_script.main(["--model", "tiny", "--tokenizer", demo_tokenizer, "--train_data", meld,
                              "--out_dir", str(run), "--dtype", "fp32", "--device", "cpu", "--kernels", "off",
                              "--micro_batch", "4", "--grad_accum", "1", "--max_steps", "2",
                              "--save_every", "2"]) == 0
    common = ["--run", str(run), "--data", meld, "--split", "test", "--dtype", "fp32", "--device", "cpu",
              "--kernels", "off", "--calibration", "dev"]
    assert eval_script.main(common + ["--out_dir", str(tmp_path / "e1")]) == 0
    assert "fitting meld label offsets on the dev split" in capsys.readouterr().out
    adapters_dir = run / "checkpoints" / "step_0000002"
    cal = read_calibrations(adapters_dir)["meld"]
    report = json.loads((tmp_path / "e1" / "report.json").read_text())
    assert report["calibration"]["offsets"] == list(cal.offsets) and report["calibration"]["in_sample"] is False
    assert set(report["uncalibrated"]) == {"accuracy", "weighted_f1", "macro_f1"}
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
