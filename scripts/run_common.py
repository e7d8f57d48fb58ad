"""What the measured ERC runs share: the two text baselines, a logged subprocess, the machine and git state.

Used by the scripts/*_run.py studies; every score is scikit-learn's.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from llama_erc.benchmarks.provenance import ROOT
from llama_erc.data import MELD_LABELS, load_dialogues
from llama_erc.engine.metrics import classification_report

C_GRID = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)  # logistic-regression inverse regularisation, chosen on dev
C_FIXED = 1.0  # the a-priori choice (scikit-learn's default), reported alongside the dev-selected one


def scores(rep: dict) -> dict:
    return {k: round(100 * rep[k], 2) for k in ("accuracy", "weighted_f1", "macro_f1")}


def _utterances(dialogues) -> tuple[list[str], list[str]]:
    utts = [u for d in dialogues for u in d.utterances]
    return [u.text for u in utts], [u.emotion for u in utts]


def baselines(meld: Path) -> dict:
    """Majority class and TF-IDF + logistic regression, fit on train, C chosen on dev, scored on test."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    (x_tr, y_tr), (x_dev, y_dev), (x_te, y_te) = (_utterances(load_dialogues("meld", meld, s))
                                                  for s in ("train", "dev", "test"))
    labels = list(MELD_LABELS)
    majority = Counter(y_tr).most_common(1)[0][0]
    out = {"majority": {"label": majority, **scores(classification_report(y_te, [majority] * len(y_te), labels))}}

    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, lowercase=True)
    f_tr, f_dev, f_te = vec.fit_transform(x_tr), vec.transform(x_dev), vec.transform(x_te)
    dev_f1 = {}
    for c in C_GRID:
        clf = LogisticRegression(C=c, max_iter=2000).fit(f_tr, y_tr)
        dev_f1[c] = classification_report(y_dev, list(clf.predict(f_dev)), labels)["weighted_f1"]
    best_c = max(C_GRID, key=lambda c: (dev_f1[c], -c))
    for key, c in (("tfidf_lr", best_c), ("tfidf_lr_c1", C_FIXED)):
        clf = LogisticRegression(C=c, max_iter=2000).fit(f_tr, y_tr)
        out[key] = {"C": c, "C_from": "dev" if key == "tfidf_lr" else "fixed a priori",
                    **scores(classification_report(y_te, list(clf.predict(f_te)), labels))}
    out["tfidf_lr"].update(dev_weighted_f1_by_C={str(c): round(100 * v, 2) for c, v in dev_f1.items()},
                           n_features=len(vec.vocabulary_))
    out["n"] = {"train": len(y_tr), "dev": len(y_dev), "test": len(y_te)}
    return out


def run_logged(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> float:
    """Run a command from the repo root, echoing and saving its output; raise on failure; -> wall seconds."""
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=None if env is None else {**os.environ, **env})
        for line in proc.stdout:
            sys.stdout.write(line)
            f.write(line)
        rc = proc.wait()
    if rc != 0:
        raise RuntimeError(f"{cmd[1]} exited with {rc}; see {log}")
    return time.perf_counter() - t0


def write_results(result: dict, out_json: Path, notes: Path, t0: float) -> dict:
    """Write a study's results file: `result`, the hand-written notes file when there is one, and this
    invocation's wall time."""
    if notes.is_file():
        result["notes"] = json.loads(notes.read_text())
    result["wall_s_this_invocation"] = round(time.perf_counter() - t0, 1)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=2) + "\n")
    return result


def machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"device": "cpu", "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "load_avg_at_start": [round(x, 2) for x in os.getloadavg()]}


def git_state(own_outputs: tuple[Path, ...] = (), root: Path = ROOT) -> dict:
    """The commit of the repository at `root` and whether a tracked file differs from it. own_outputs: the files
    the calling study writes (its results JSON), left out of "dirty": a study that rewrites its results after
    every arm would otherwise read its own earlier write as uncommitted work."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True).stdout.strip()
    top = Path(root).resolve()
    exclude = [f":(exclude){Path(p).resolve().relative_to(top).as_posix()}" for p in own_outputs
               if Path(p).resolve().is_relative_to(top)]
    return {"commit": git("rev-parse", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no", "--", ".", *exclude))}


def launch_state(own_outputs: tuple[Path, ...] = ()) -> dict:
    """The machine and git state when a study starts, taken once: the results file is rewritten after every arm
    (or dataset), and by then the load average is the study's own and the tree holds its own writes."""
    return {"machine": machine(), "git": git_state(own_outputs)}


