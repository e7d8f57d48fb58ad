"""The SmolLM2 ERC study at full budget: MELD and EmoryNLP, separately and jointly, whole epochs, seeds.

    python scripts/erc_full_run.py --arms meld/baseline/0,emorynlp/baseline/0      # runs what is missing
    python scripts/erc_full_run.py --collect          # rebuild the results file from what has run

An arm is DATASET/SYSTEM/SEED. DATASET is meld, emorynlp or joint (trained on both train splits, leak-filtered
by the guard of data/leaks.py, and scored on each corpus); SYSTEM is one of erc_levers_run.py's systems or several
joined by '+', optionally with a budget of N whole epochs, `@Nep` (e.g. emorynlp/baseline@2ep/0; without it,
--epochs): a system trained longer is another system, with its own rows, spread and place in `best_by_dev`.
Every arm trains its whole epochs of the baseline recipe of
benchmarks/results/meld_smollm2_cpu.json (chat prompt, 2 previous turns, LoRA r=8 on all seven linears, packed rows
with the shared prefix, lr 1e-3, --micro-batch sequences a step) with --dtype auto, evaluates on dev
--evals-per-epoch times and keeps the best adapters by dev weighted F1. Then one `eval.py --split test
--calibration dev` per scored corpus reads test once: it scores the best adapters as trained and with the
prior-shift calibration (fit on dev reweighted to train's label mix, cross-fitted by dialogue; the record says so).

Rows: dev as trained (the best dev evaluation), dev calibrated (the calibration's out-of-fold estimate, reweighted
to train's label mix), test as trained and test calibrated. Nothing is chosen on test: `best_by_dev` is, per
scored corpus, the (system, calibration) whose dev weighted F1 averaged over its seeds is highest; calibration is
compared on the calibration's own out-of-fold numbers (strength 0 is "as trained", same weighting).
A finished stage is not rerun (an interrupted training resumes from its last checkpoint); delete an arm's
directory to redo it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import erc_levers_run as levers
from run_common import ROOT, launch_state, run_logged, write_results

from llama_erc.benchmarks.provenance import repo_relative
from llama_erc.demo.pretrained import smollm2_gguf

CORPORA = ("meld", "emorynlp")
AS_TRAINED, CALIBRATED = "none", "prior-shift"


def parse_arm(text: str) -> tuple[str, str, int]:
    parts = text.split("/")
    if len(parts) != 3 or not parts[2].isdigit():
        raise SystemExit(f"arm {text!r}: expected DATASET/SYSTEM/SEED, e.g. meld/baseline/0")
    dataset, system, seed = parts[0], parts[1], int(parts[2])
    if dataset not in (*CORPORA, "joint"):
        raise SystemExit(f"arm {text!r}: unknown dataset {dataset!r}; known: {', '.join(CORPORA)}, joint")
    levers.system_flags(split_epochs(system, text)[0])  # an unknown system fails now, not after an hour of training
    return dataset, system, seed


def split_epochs(system: str, arm: str = "") -> tuple[str, int | None]:
    """"retrieval@2ep" -> ("retrieval", 2); "retrieval" -> ("retrieval", None): the study's --epochs."""
    name, at, budget = system.partition("@")
    if not at:
        return name, None
    n = budget.removesuffix("ep")
    if not budget.endswith("ep") or not n.isdigit() or int(n) < 1:
        raise SystemExit(f"arm {arm or system!r}: the epoch budget {'@' + budget!r} is not @Nep with N >= 1, "
                         f"e.g. baseline@2ep")
    return name, int(n)


def arm_epochs(arm: tuple[str, str, int], a: argparse.Namespace) -> int:
    return split_epochs(arm[1])[1] or a.epochs


def scored_corpora(dataset: str) -> tuple[str, ...]:
    return CORPORA if dataset == "joint" else (dataset,)


def specs(dataset: str, data_root: Path) -> list[str]:
    return [f"{c}={repo_relative(data_root / levers.DATA_DIRS[c])}" for c in scored_corpora(dataset)]


def train_examples(train_specs: list[str]) -> int:
    """Training utterances after the leak guard (one ERC example each): what an epoch's steps are counted from."""
    from llama_erc.data.leaks import LeakGuard

    guard = LeakGuard(train_specs)
    return sum(len(d.utterances) for s in train_specs for d in guard.train_dialogues(s))


def train_command(arm: tuple[str, str, int], a: argparse.Namespace, model: str, lora: Path) -> list[str]:
    dataset, system, seed = arm
    data = specs(dataset, a.data_root)
    steps_per_epoch = math.ceil(train_examples(data) / a.micro_batch)
    eval_every = max(1, math.ceil(steps_per_epoch / a.evals_per_epoch))
    flags, warmup = levers.system_flags(split_epochs(system)[0])
    if warmup:
        raise SystemExit("the speaker warm-up stage is not part of this study's arms (erc_levers_run.py runs it)")
    return [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=1", "train.py",
            "--model", model, "--train_data", ",".join(data), "--dev_data", ",".join(data), "--out_dir", str(lora),
            "--prompt_format", "chat", "--dtype", a.dtype, "--kernels", "off", "--activation_checkpointing", "none",
            "--packing", "--share_prefix", "--context_turns", "2", "--max_len", str(a.max_len), "--micro_batch",
            str(a.micro_batch), "--grad_accum", "1", "--epochs", str(arm_epochs(arm, a)), "--max_steps", "0", "--lr",
            str(a.lr), "--warmup_steps", "20", "--lora_rank", "8", "--lora_alpha", "16", "--lora_targets",
            levers.LORA_TARGETS, "--lora_dropout", "0.05", "--seed", str(seed), "--log_every", "10",
            "--eval_every", str(eval_every), "--save_every", str(eval_every), "--eval_batch_size",
            str(a.eval_batch), *flags]  # later flags win in argparse


def arm_dir(arm: tuple[str, str, int], out: Path) -> Path:
    dataset, system, seed = arm
    return Path(repo_relative(out)) / dataset / system / f"seed{seed}"


def _finished(cell: Path) -> bool:
    """train.py's last words in the arm's train.log say it reached its last step, not that it was interrupted."""
    log = ROOT / cell / "train.log"
    done = [x for x in log.read_text().splitlines() if x.startswith("done at step")] if log.is_file() else []
    return bool(done) and "interrupted" not in done[-1]


def check_budget(arm: tuple[str, str, int], a: argparse.Namespace) -> None:
    """An arm directory trained at another budget is neither resumed nor re-read as this arm."""
    config = ROOT / arm_dir(arm, a.out) / "lora" / "config.json"
    trained = json.loads(config.read_text()).get("epochs") if config.is_file() else None
    if trained is not None and trained != arm_epochs(arm, a):
        raise SystemExit(f"{config.parent.parent}: trained for {trained} epochs, but this arm asks for "
                         f"{arm_epochs(arm, a)} (--epochs {a.epochs}); name the budget in the arm (SYSTEM@Nep) or "
                         f"delete the directory")


def run_arm(arm: tuple[str, str, int], a: argparse.Namespace, model: str, commands: dict) -> None:
    """Train the arm (unless finished) and read test once per scored corpus; main has run check_budget."""
    cell = arm_dir(arm, a.out)
    lora = cell / "lora"
    (ROOT / cell).mkdir(parents=True, exist_ok=True)
    env = {"OMP_NUM_THREADS": str(os.cpu_count())}  # torchrun would set 1: give the one process every core
    cmds = {"train": train_command(arm, a, model, lora)}
    if not _finished(cell):
        resume = ["--resume"] if (ROOT / lora / "checkpoints").is_dir() else []
        run_logged(cmds["train"] + resume, ROOT / cell / "train.log", env=env)
    for spec in specs(arm[0], a.data_root):
        kind = spec.partition("=")[0]
        out = cell / f"eval_test_{kind}"
        cmds[f"eval_{kind}"] = [sys.executable, "eval.py", "--run", str(lora), "--data", spec, "--split", "test",
                                "--calibration", "dev", "--calibration_metric", "weighted_f1", "--batch_size",
                                str(a.eval_batch), "--out_dir", str(out)]
        if not (ROOT / out / "report.json").is_file():
            run_logged(cmds[f"eval_{kind}"], ROOT / cell / f"eval_{kind}.log")
    commands["/".join(map(str, arm))] = {k: " ".join([repo_relative(c[0])] + c[1:]) for k, c in cmds.items()}


def _scores(d: dict, prefix: str = "") -> dict:
    return {k: round(100 * d[prefix + k], 2) for k in ("accuracy", "weighted_f1", "macro_f1") if prefix + k in d}


def _per_label(per_class: dict) -> dict:
    return {lab: round(100 * v["f1"], 2) for lab, v in per_class.items()}


def arm_rows(arm: tuple[str, str, int], out: Path) -> list[dict]:
    """The arm's rows, or [] while its test evaluation has not run."""
    dataset, system, seed = arm
    cell = ROOT / arm_dir(arm, out)
    lora = cell / "lora"
    if not (lora / "best" / "config.json").is_file():
        return []
    best = json.loads((lora / "best" / "config.json").read_text())
    records = [json.loads(x) for x in (lora / "metrics.jsonl").read_text().splitlines()]
    train_steps = max(r["step"] for r in records if "loss" in r)
    epochs = json.loads((lora / "config.json").read_text())["epochs"]  # train.py's config, as it ran
    rows = []
    for kind in scored_corpora(dataset):
        report_file = cell / f"eval_test_{kind}" / "report.json"
        if not report_file.is_file():
            return []
        rep = json.loads(report_file.read_text())
        cal, raw = rep["calibration"], rep["uncalibrated"]
        oof = cal["fit"]["out_of_fold"]
        applied = cal["strength"][cal["metric"]]  # test is scored at this one strength, so dev is too
        base = {"dataset": kind, "trained_on": dataset, "system": system, "seed": seed, "epochs": epochs,
                "train_steps": train_steps, "best_step": best["step"]}
        rows += [
            {**base, "split": "dev", "calibration": AS_TRAINED, **_scores(best["metrics"], f"{kind}_"),
             "source": f"dev evaluation at step {best['step']} (the best of the run)"},
            {**base, "split": "dev", "calibration": CALIBRATED,
             **{m: round(100 * oof[m][str(applied)], 2) for m in oof},
             "source": "the calibration's out-of-fold estimate (5 dialogue folds, dev reweighted to train's "
                       "label mix)",
             "as_trained_same_weighting": {m: round(100 * oof[m][str(0.0)], 2) for m in oof}},
            {**base, "split": "test", "calibration": AS_TRAINED, **_scores(raw),
             "per_label_f1": _per_label(raw["per_class"])},
            {**base, "split": "test", "calibration": CALIBRATED, **_scores(rep), "per_label_f1":
             _per_label(rep["per_class"]), "strength": applied, "temperature": round(cal["temperature"], 4)},
        ]
    return rows


def best_by_dev(rows: list[dict]) -> dict:
    """Per scored corpus, the (trained_on/system, calibration) with the highest dev weighted F1 averaged over its
    seeds; calibrated and as-trained compared on the same out-of-fold weighting. Never a test number."""
    dev: dict[str, dict[tuple[str, str], list[float]]] = {}
    for r in rows:
        if r["split"] != "dev":
            continue
        if r["calibration"] == CALIBRATED:
            dev.setdefault(r["dataset"], {}).setdefault((f"{r['trained_on']}/{r['system']}", CALIBRATED), []) \
                .append(r["weighted_f1"])
            dev[r["dataset"]].setdefault((f"{r['trained_on']}/{r['system']}", AS_TRAINED + " (out-of-fold)"), []) \
                .append(r["as_trained_same_weighting"]["weighted_f1"])
    out = {}
    for kind, cands in sorted(dev.items()):
        (arm, calibration) = max(sorted(cands), key=lambda c: statistics.mean(cands[c]))
        out[kind] = {"arm": arm, "calibration": calibration.split(" ")[0],
                     "dev_weighted_f1": round(statistics.mean(cands[(arm, calibration)]), 2)}
    return out


def spread(rows: list[dict]) -> list[dict]:
    """Mean and spread (min, max, population sd) over seeds of each (dataset, trained_on, system, split,
    calibration)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["trained_on"], r["system"], r["split"], r["calibration"]), []).append(r)
    out = []
    for (dataset, trained_on, system, split, calibration), rs in sorted(groups.items()):
        entry = {"dataset": dataset, "trained_on": trained_on, "system": system, "split": split,
                 "calibration": calibration, "seeds": sorted(r["seed"] for r in rs)}
        for m in ("accuracy", "weighted_f1", "macro_f1"):
            vals = [r[m] for r in rs if m in r]  # the out-of-fold dev rows have no accuracy
            if not vals:
                continue
            entry[m] = {"mean": round(statistics.mean(vals), 2), "min": min(vals), "max": max(vals),
                        "sd": round(statistics.pstdev(vals), 2)}
        out.append(entry)
    return out


def leak_of(arm: tuple[str, str, int], out: Path) -> dict | None:
    record = ROOT / arm_dir(arm, out) / "lora" / "best" / "config.json"
    return json.loads(record.read_text()).get("leak") if record.is_file() else None


def _arm_of(row: dict) -> tuple[str, str, int]:
    return row["trained_on"], row["system"], row["seed"]


def _row_order(row: dict) -> tuple:
    return (*_arm_of(row), row["dataset"] != row["trained_on"], row["dataset"], row["split"],
            row["calibration"] != AS_TRAINED)


def _with_epochs(row: dict, epochs: int) -> dict:
    """A row written before rows recorded their epochs, given the epochs of the recipe its file was written with
    (every such invocation ran that one budget); placed after the seed, where new rows have it."""
    if "epochs" in row:
        return row
    out = {}
    for k, v in row.items():
        out[k] = v
        if k == "seed":
            out["epochs"] = epochs
    return out


def earlier_rows(old: dict, here: set[tuple[str, str, int]]) -> list[dict]:
    """The rows of arms that finished in an earlier invocation (perhaps on another machine, its runs/ gone) and
    have no finished directory here: a study spread over sessions keeps every arm; an arm rerun here replaces
    its old rows."""
    return [r for r in old.get("rows", []) if _arm_of(r) not in here]


def provenance_of_earlier(old: dict, arms: set[tuple[str, str, int]]) -> dict:
    """Where the arms an earlier invocation ran (kept or re-read unchanged) ran: the date, commit and CPU of that
    invocation (carried over when the old file had them from one before it)."""
    before = old.get("arms_from_earlier_invocations", {})
    this = {"date": old.get("date"), "commit": old.get("git", {}).get("commit"),
            "cpu": old.get("machine", {}).get("cpu")}
    return {k: before.get(k, this) for k in sorted("/".join(map(str, arm)) for arm in arms)}


def collect(a: argparse.Namespace, commands: dict, t0: float, launch: dict) -> dict:
    """Rebuild the results file from every arm under a.out. launch: run_common.launch_state() of this invocation."""
    out = ROOT / repo_relative(a.out)
    arms = sorted((d.parent.parent.name, d.parent.name, int(d.name[4:])) for d in out.glob("*/*/seed*")
                  if d.is_dir()) if out.is_dir() else []
    by_arm = {arm: arm_rows(arm, a.out) for arm in arms}  # read each arm's reports once
    old = json.loads(a.out_json.read_text()) if a.out_json.is_file() else {}
    if old.get("rows"):
        old["rows"] = [_with_epochs(r, old.get("recipe", {}).get("epochs", a.epochs)) for r in old["rows"]]
    kept = earlier_rows(old, {arm for arm in arms if by_arm[arm]})
    rows = sorted(kept + [r for arm in arms for r in by_arm[arm]], key=_row_order)
    # Invocations that share one runs/ directory re-read each other's arms: one this invocation did not run whose
    # rows come back exactly as the old file had them ran earlier and keeps its provenance; changed rows are new.
    old_by_arm: dict[tuple[str, str, int], list[dict]] = {}
    for r in old.get("rows", []):
        old_by_arm.setdefault(_arm_of(r), []).append(r)
    ran_here = {parse_arm(k) for k in commands}
    reread = {arm for arm, rs in by_arm.items() if rs and arm not in ran_here
              and sorted(rs, key=_row_order) == sorted(old_by_arm.get(arm, []), key=_row_order)}
    done = sorted({_arm_of(r) for r in rows})
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), **launch,
        "model": repo_relative(smollm2_gguf()),
        "recipe": {"epochs": a.epochs, "epochs_of": "an arm whose system has no @Nep (each row says its own)",
                   "sequences_per_step": a.micro_batch, "evals_per_epoch": a.evals_per_epoch, "lr": a.lr,
                   "max_len": a.max_len, "dtype": a.dtype,
                   "selection": "the best adapters by dev weighted F1 of the run's dev evaluations"},
        "systems": {name: " ".join(flags) for name, (flags, warm) in levers.SYSTEMS.items() if not warm},
        "commands": {**old.get("commands", {}), **commands},
        "arms_run": ["/".join(map(str, arm)) for arm in done],
        "arms_from_earlier_invocations": provenance_of_earlier(old, {_arm_of(r) for r in kept} | reread),
        "arms_pending": ["/".join(map(str, arm)) for arm in arms if not by_arm[arm] and arm not in done],
        "leak": {**{k: v for k, v in old.get("leak", {}).items() if parse_arm(k) in done},
                 **{"/".join(map(str, arm)): leak_of(arm, a.out) for arm in arms if arm[0] == "joint"}},
        "best_by_dev": best_by_dev(rows),
        "spread": spread(rows),
        "rows": rows,
    }
    return write_results(result, a.out_json, a.notes, t0)


def print_table(result: dict) -> None:
    print(f"\n{'dataset':<10}{'arm':<34}{'split':<6}{'calibration':<13}{'acc':>7}{'w-F1':>7}{'m-F1':>7}")
    for r in result["rows"]:
        arm = f"{r['trained_on']}/{r['system']}/{r['seed']}"
        print(f"{r['dataset']:<10}{arm:<34}{r['split']:<6}{r['calibration']:<13}{r.get('accuracy', float('nan')):>7.2f}"
              f"{r['weighted_f1']:>7.2f}{r['macro_f1']:>7.2f}")
    print(f"best by dev: {json.dumps(result['best_by_dev'])}")
    if result["arms_pending"]:
        print(f"pending: {', '.join(result['arms_pending'])}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arms", default="meld/baseline/0,emorynlp/baseline/0",
                   help="comma-separated DATASET/SYSTEM/SEED, run in this order")
    p.add_argument("--collect", action="store_true", help="only rebuild the results file from what has run")
    p.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "erc_full")
    p.add_argument("--out-json", type=Path, default=ROOT / "benchmarks" / "results" / "erc_full_smollm2.json")
    p.add_argument("--notes", type=Path, default=ROOT / "benchmarks" / "results" / "erc_full_notes.json",
                   help="hand-written notes copied into the results file when present")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--evals-per-epoch", type=int, default=2)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--eval-batch", type=int, default=16)
    p.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp32"))
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    launch = launch_state((a.out_json,))
    commands: dict = {}
    if not a.collect:
        arms = [parse_arm(x) for x in a.arms.split(",") if x]
        for dataset in {d for d, _, _ in arms}:
            for spec in specs(dataset, a.data_root):
                if not (ROOT / spec.partition("=")[2]).exists():
                    raise SystemExit(f"{spec}: no such data (see ../shared/data's READMEs)")
        for arm in arms:
            check_budget(arm, a)  # every arm before the first one trains
        model = repo_relative(smollm2_gguf())
        for arm in arms:
            run_arm(arm, a, model, commands)
            collect(a, commands, t0, launch)  # after every arm, so an interrupted study keeps what finished
    print_table(collect(a, commands, t0, launch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
