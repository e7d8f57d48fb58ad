"""Label priors calibrated on dev, two ways, stored beside a run's adapters (calibration.json, keyed by dataset).

A fine-tuned classifier's label scores carry the train split's label prior, and a small model over-predicts the
majority label (neutral is about 47% of MELD). Both methods predict with one additive offset per label,

    argmax_c  log p(c | prompt) + o_c

and differ in how the offsets are fit and how honest their dev score is.

`prior-shift` (eval.py --calibration dev), fit out of sample:
  1. dev is reweighted to the train split's label mix: utterance i weighs pi_train(y_i) / pi_dev(y_i), so what is
     fit is what a split labelled like train (MELD's test is; its dev is not: 42.4% neutral against 47.2% and
     48.1%) would ask for, not dev's own prior;
  2. a temperature T and a bias b per label are fit by weighted likelihood, softmax(log p / T + b) (torch LBFGS,
     fp64); argmax(log p / T + b) = argmax(log p + T b), so the decision offsets are T b;
  3. one scalar strength s (offsets s T b, s in STRENGTHS) is chosen per target metric (weighted F1, macro F1)
     on cross-fitted predictions: the dev dialogues are cut into FOLDS folds, each fold predicted by a fit on the
     others, so no utterance is scored by offsets fit on it; ties go to the smaller s (s = 0: no change);
  4. the final T and b are fit on the whole dev split; the record names its data, the weights, the folds and
     every strength's out-of-fold score.
`dev-insample` (eval.py --calibration dev-insample), the earlier search: each label's offset in turn moves to the
  grid value that most raises dev weighted F1, until a round raises nothing. Its dev scores are in-sample (the
  offsets were fit on those utterances) and every report says so.
Nothing is ever fit on the split a report scores (on dev itself, the report is marked in-sample).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from llama_erc.engine.metrics import classification_report

CALIBRATION_FILE = "calibration.json"
# Offsets in nats. +-3 moves a label's odds by e^3 = 20x either way, more than a dev split of ~1k utterances
# can estimate; a 0.1 step is finer than one dev utterance's share of weighted F1 needs.
OFFSET_GRID = np.round(np.arange(-3.0, 3.0 + 1e-9, 0.1), 2)
MAX_ROUNDS = 20


METRICS = ("weighted_f1", "macro_f1")  # what a prior-shift strength is chosen for
STRENGTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
FOLDS = 5


def _check_scores(lp: np.ndarray, labels: tuple[str, ...], dataset: str) -> np.ndarray:
    lp = np.asarray(lp, dtype=np.float64)
    if lp.ndim != 2 or lp.shape[1] != len(labels):
        raise ValueError(f"calibration for {dataset} has {len(labels)} labels, scores have shape {lp.shape}")
    return lp


@dataclass(frozen=True)
class Calibration:
    """dev-insample: offsets fit on one dataset's dev split by the F1 search; labels in the decoder's order."""
    dataset: str
    labels: tuple[str, ...]
    offsets: tuple[float, ...]
    n_dev: int
    dev_before: dict  # accuracy, weighted_f1, macro_f1 on dev without the offsets
    dev_after: dict   # the same with them (in-sample: the offsets were fit on these utterances)
    rounds: int
    method: str = "dev-insample"

    def offsets_for(self, metric: str = "weighted_f1") -> tuple[float, ...]:
        return self.offsets  # one set, searched on weighted F1, whatever the metric

    def predict(self, log_probs: np.ndarray, metric: str = "weighted_f1") -> np.ndarray:
        """(N, C) log-probabilities over `labels` -> (N,) calibrated label indices."""
        lp = _check_scores(log_probs, self.labels, self.dataset)
        return np.argmax(lp + np.asarray(self.offsets_for(metric)), axis=1)

    def summary(self) -> str:
        before, after = 100 * self.dev_before["weighted_f1"], 100 * self.dev_after["weighted_f1"]
        offsets = dict(zip(self.labels, self.offsets))
        return f"dev weighted F1 {before:.2f} -> {after:.2f} (in-sample), offsets {offsets}"


@dataclass(frozen=True)
class PriorShift:
    """prior-shift: temperature and label bias fit by likelihood on dev reweighted to train's label mix, applied at
    the strength chosen out of fold for each metric (module docstring)."""
    dataset: str
    labels: tuple[str, ...]
    temperature: float
    bias: tuple[float, ...]          # nats, mean 0
    strength: dict[str, float]       # metric -> s; the decision offsets are s * temperature * bias
    fit: dict = field(default_factory=dict)  # what it was fit on and how (data, weights, folds, out-of-fold scores)
    method: str = "prior-shift"

    def offsets_for(self, metric: str = "weighted_f1") -> tuple[float, ...]:
        if metric not in self.strength:
            raise ValueError(f"calibration for {self.dataset} has strengths for {sorted(self.strength)}, "
                             f"not {metric!r}")
        return tuple(float(x) for x in self.strength[metric] * self.temperature * np.asarray(self.bias))

    def predict(self, log_probs: np.ndarray, metric: str = "weighted_f1") -> np.ndarray:
        lp = _check_scores(log_probs, self.labels, self.dataset)
        return np.argmax(lp + np.asarray(self.offsets_for(metric)), axis=1)

    def summary(self) -> str:
        return (f"T {self.temperature:.3f}, bias {dict(zip(self.labels, np.round(self.bias, 3).tolist()))}, strength "
                f"{self.strength} (chosen on {self.fit.get('folds')}-fold cross-fitted dev predictions)")


def f1_scores(gold: np.ndarray, pred: np.ndarray, n_classes: int,
              weight: np.ndarray | None = None) -> dict[str, float]:
    """{"weighted_f1", "macro_f1"} on label indices, each utterance counted `weight` times (scikit-learn's
    average="weighted" / "macro" with sample_weight, zero_division=0, every class in the macro mean); a fast twin
    for the fits' inner loops, tested against scikit-learn."""
    gold, pred = np.asarray(gold), np.asarray(pred)
    w = np.ones(len(gold)) if weight is None else np.asarray(weight, dtype=np.float64)
    tp = np.bincount(gold[gold == pred], weights=w[gold == pred], minlength=n_classes)
    support = np.bincount(gold, weights=w, minlength=n_classes)
    predicted = np.bincount(pred, weights=w, minlength=n_classes)
    denom = support + predicted  # F1 = 2 tp / (support + predicted); 0 where a class is never seen nor predicted
    f1 = np.divide(2 * tp, denom, out=np.zeros(n_classes), where=denom > 0)
    return {"weighted_f1": float((f1 * support).sum() / max(1e-12, support.sum())), "macro_f1": float(f1.mean())}


def weighted_f1(gold: np.ndarray, pred: np.ndarray, n_classes: int) -> float:
    return f1_scores(gold, pred, n_classes)["weighted_f1"]


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


def dialogue_folds(dialogue_ids: list[str], k: int) -> np.ndarray:
    """(N,) fold index of each utterance: dialogues, in order of first appearance, dealt round-robin into k folds,
    so a dialogue's utterances are never split across folds."""
    order = list(dict.fromkeys(dialogue_ids))
    if len(order) < 2:
        raise ValueError(f"cross-fitting needs at least 2 dev dialogues, got {len(order)}")
    fold_of = {d: i % min(k, len(order)) for i, d in enumerate(order)}
    return np.array([fold_of[d] for d in dialogue_ids])


def _fit_temperature_bias(lp: np.ndarray, gold: np.ndarray, weight: np.ndarray) -> tuple[float, np.ndarray]:
    """(T, b) minimising the weighted mean NLL of softmax(lp / T + b); b is centred (adding a constant to every
    label's bias changes nothing), and a 1e-4 L2 term keeps the optimum unique."""
    x = torch.tensor(np.maximum(lp, -100.0), dtype=torch.float64)  # a prob that underflowed to 0 stays finite
    y = torch.tensor(gold, dtype=torch.long)
    w = torch.tensor(weight / weight.sum(), dtype=torch.float64)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    b = torch.zeros(lp.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t, b], lr=1.0, max_iter=500, tolerance_grad=1e-10, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (w * F.cross_entropy(x / log_t.exp() + b, y, reduction="none")).sum() + 1e-4 * (b * b).sum()
        loss.backward()
        return loss
    opt.step(closure)
    bias = b.detach().numpy()
    return float(log_t.detach().exp()), bias - bias.mean()


def fit_prior_shift(log_probs: np.ndarray, gold: np.ndarray, dialogue_ids: list[str], train_counts: np.ndarray,
                    labels: tuple[str, ...], dataset: str, data: str, folds: int = FOLDS) -> PriorShift:
    """The prior-shift calibration of one dataset (module docstring). log_probs (N, C) and gold (N,) over
    `labels` are the dev split's, dialogue_ids (N,) its dialogues, train_counts (C,) the train split's label
    counts; `data` says in words what the dev split is, for the record."""
    lp = _check_scores(log_probs, labels, dataset)
    gold, counts = np.asarray(gold), np.asarray(train_counts, dtype=np.float64)
    n, c = lp.shape
    if gold.shape != (n,) or len(dialogue_ids) != n or counts.shape != (c,):
        raise ValueError(f"fit_prior_shift: scores {lp.shape}, gold {gold.shape}, {len(dialogue_ids)} dialogue ids, "
                         f"train counts {counts.shape}, {c} labels")
    train_mix = (counts + 1) / (counts.sum() + c)  # add-one: a label train lacks still weighs something
    dev_mix = (np.bincount(gold, minlength=c) + 1) / (n + c)
    label_weight = train_mix / dev_mix
    weight = label_weight[gold]  # (N,) dev reweighted to train's label mix
    fold = dialogue_folds(list(dialogue_ids), folds)
    oof_offsets = np.zeros((n, c))  # T b of the fit on the other folds, for each utterance
    for k in np.unique(fold):
        held = fold == k
        t, b = _fit_temperature_bias(lp[~held], gold[~held], weight[~held])
        oof_offsets[held] = t * b
    oof = {m: {} for m in METRICS}
    for s in STRENGTHS:
        scores = f1_scores(gold, np.argmax(lp + s * oof_offsets, axis=1), c, weight)
        for m in METRICS:
            oof[m][s] = scores[m]
    strength = {m: max(STRENGTHS, key=lambda s: (round(oof[m][s], 12), -s)) for m in METRICS}
    t, b = _fit_temperature_bias(lp, gold, weight)
    record = {"data": data, "n": n, "dialogues": len(set(dialogue_ids)), "reweighted_to": "the train split's label mix",
              "train_mix": dict(zip(labels, np.round(train_mix, 6).tolist())),
              "dev_mix": dict(zip(labels, np.round(dev_mix, 6).tolist())),
              "label_weight": dict(zip(labels, np.round(label_weight, 6).tolist())), "folds": int(fold.max() + 1),
              "fold_by": "dialogue", "strengths": list(STRENGTHS),
              "out_of_fold": {m: {str(s): v for s, v in oof[m].items()} for m in METRICS},
              "out_of_fold_weighted_by": "label_weight"}
    return PriorShift(dataset=dataset, labels=tuple(labels), temperature=t, bias=tuple(float(x) for x in b),
                      strength=strength, fit=record)


def _scores(gold: np.ndarray, pred: np.ndarray, labels: tuple[str, ...]) -> dict:
    rep = classification_report([labels[i] for i in gold], [labels[i] for i in pred], list(labels))
    return {k: rep[k] for k in ("accuracy", "weighted_f1", "macro_f1")}


def _entry(raw: dict) -> Calibration | PriorShift:
    """A stored entry; one without a method was written by the in-sample search before prior-shift existed."""
    if raw.get("method", "dev-insample") == "dev-insample":
        return Calibration(**{**raw, "labels": tuple(raw["labels"]), "offsets": tuple(raw["offsets"])})
    if raw["method"] == "prior-shift":
        return PriorShift(**{**raw, "labels": tuple(raw["labels"]), "bias": tuple(raw["bias"])})
    raise KeyError(f"method {raw['method']!r}")


def read_calibrations(adapters_dir: Path) -> dict[str, Calibration | PriorShift]:
    """{dataset: Calibration or PriorShift} stored beside a run's adapters; {} when none has been fit yet."""
    file = adapters_dir / CALIBRATION_FILE
    if not file.is_file():
        return {}
    try:
        raw = json.loads(file.read_text())
        return {name: _entry(entry) for name, entry in raw.items()}
    except (json.JSONDecodeError, TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"{file}: not a calibration file ({type(e).__name__}: {e}); delete it to fit again") from None


def write_calibration(adapters_dir: Path, cal: Calibration | PriorShift) -> Path:
    """Add (or replace) one dataset's offsets in calibration.json, written whole then renamed into place."""
    entries = {name: asdict(c) for name, c in read_calibrations(adapters_dir).items()}
    entries[cal.dataset] = asdict(cal)
    file = adapters_dir / CALIBRATION_FILE
    tmp = file.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(entries, indent=2, sort_keys=True) + "\n")
    tmp.replace(file)
    return file
