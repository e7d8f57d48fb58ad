"""Label priors calibrated on dev: one additive log-prior offset per label, fit to maximise dev weighted F1.

A fine-tuned classifier's label scores carry the train split's label prior, and a small model over-predicts
the majority label (neutral is about 47% of MELD). Calibration predicts

    argmax_c  log p(c | prompt) + b_c

with one offset b_c per label, fit on the dev split only (never on test) by coordinate ascent: each label's
offset in turn moves to the grid value that most raises dev weighted F1 with the others held, until a full
round raises nothing. Only strict improvements move an offset, so ties keep the offsets at 0 (no change),
and the fit is deterministic. Adding one constant to every b_c changes no prediction, so the fit starts at 0
and the grid is centred there.

`eval.py --run R --calibration dev` fits the offsets on the dev split of each --data corpus the first time and
stores them beside the adapters (calibration.json, keyed by dataset); later evaluations read them back.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from llama_erc.engine.metrics import classification_report

CALIBRATION_FILE = "calibration.json"
# Offsets in nats. +-3 moves a label's odds by e^3 = 20x either way, more than a dev split of ~1k utterances
# can estimate; a 0.1 step is finer than one dev utterance's share of weighted F1 needs.
OFFSET_GRID = np.round(np.arange(-3.0, 3.0 + 1e-9, 0.1), 2)
MAX_ROUNDS = 20


@dataclass(frozen=True)
class Calibration:
    """Offsets fit on one dataset's dev split: labels in the decoder's order, offsets in nats."""
    dataset: str
    labels: tuple[str, ...]
    offsets: tuple[float, ...]
    n_dev: int
    dev_before: dict  # accuracy, weighted_f1, macro_f1 on dev without the offsets
    dev_after: dict   # the same with them (in-sample: the offsets were fit on these utterances)
    rounds: int

    def predict(self, log_probs: np.ndarray) -> np.ndarray:
        """(N, C) log-probabilities over `labels` -> (N,) calibrated label indices."""
        lp = np.asarray(log_probs, dtype=np.float64)
        if lp.ndim != 2 or lp.shape[1] != len(self.labels):
            raise ValueError(f"calibration for {self.dataset} has {len(self.labels)} labels, scores have shape "
                             f"{lp.shape}")
        return np.argmax(lp + np.asarray(self.offsets), axis=1)


def weighted_f1(gold: np.ndarray, pred: np.ndarray, n_classes: int) -> float:
    """Support-weighted mean of per-class F1 (scikit-learn's average="weighted", zero_division=0), on label
    indices; a fast twin for the fit's inner loop, tested against scikit-learn."""
    gold, pred = np.asarray(gold), np.asarray(pred)
    tp = np.bincount(gold[gold == pred], minlength=n_classes).astype(np.float64)
    support = np.bincount(gold, minlength=n_classes).astype(np.float64)
    predicted = np.bincount(pred, minlength=n_classes).astype(np.float64)
    denom = support + predicted  # F1 = 2 tp / (support + predicted); 0 where a class is never seen nor predicted
    f1 = np.divide(2 * tp, denom, out=np.zeros(n_classes), where=denom > 0)
    return float((f1 * support).sum() / max(1.0, support.sum()))


def fit_calibration(log_probs: np.ndarray, gold: np.ndarray, labels: tuple[str, ...], dataset: str) -> Calibration:
    """Coordinate ascent on dev weighted F1 (module docstring). log_probs: (N, C) over `labels`; gold: (N,)
    label indices."""
    lp = np.asarray(log_probs, dtype=np.float64)
    gold = np.asarray(gold)
    n, c = lp.shape
    if c != len(labels) or gold.shape != (n,):
        raise ValueError(f"fit_calibration: scores {lp.shape}, gold {gold.shape}, {len(labels)} labels")
    offsets = np.zeros(c)
    best = weighted_f1(gold, lp.argmax(1), c)
    rounds = 0
    for rounds in range(1, MAX_ROUNDS + 1):
        improved = False
        for k in range(c):
            for v in OFFSET_GRID:
                trial = offsets.copy()
                trial[k] = v
                f1 = weighted_f1(gold, np.argmax(lp + trial, axis=1), c)
                if f1 > best + 1e-12:
                    best, offsets, improved = f1, trial, True
        if not improved:
            break
    return Calibration(dataset=dataset, labels=tuple(labels), offsets=tuple(float(x) for x in offsets), n_dev=n,
                       dev_before=_scores(gold, lp.argmax(1), labels),
                       dev_after=_scores(gold, np.argmax(lp + offsets, axis=1), labels), rounds=rounds)


def _scores(gold: np.ndarray, pred: np.ndarray, labels: tuple[str, ...]) -> dict:
    rep = classification_report([labels[i] for i in gold], [labels[i] for i in pred], list(labels))
    return {k: rep[k] for k in ("accuracy", "weighted_f1", "macro_f1")}


def read_calibrations(adapters_dir: Path) -> dict[str, Calibration]:
    """{dataset: Calibration} stored beside a run's adapters; {} when none has been fit yet."""
    file = adapters_dir / CALIBRATION_FILE
    if not file.is_file():
        return {}
    try:
        raw = json.loads(file.read_text())
        return {name: Calibration(**{**entry, "labels": tuple(entry["labels"]), "offsets": tuple(entry["offsets"])})
                for name, entry in raw.items()}
    except (json.JSONDecodeError, TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"{file}: not a calibration file ({type(e).__name__}: {e}); delete it to fit again") from None


def write_calibration(adapters_dir: Path, cal: Calibration) -> Path:
    """Add (or replace) one dataset's offsets in calibration.json, written whole then renamed into place."""
    entries = {name: asdict(c) for name, c in read_calibrations(adapters_dir).items()}
    entries[cal.dataset] = asdict(cal)
    file = adapters_dir / CALIBRATION_FILE
    tmp = file.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(entries, indent=2, sort_keys=True) + "\n")
    tmp.replace(file)
    return file
