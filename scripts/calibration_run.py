"""Does dev calibration carry to test? The in-sample search against the out-of-sample prior-shift fit, on the
SmolLM2-135M-Instruct + LoRA baseline of scripts/erc_levers_run.py (64 steps x 16 sequences, MELD and EmoryNLP).

    python scripts/calibration_run.py [--datasets meld,emorynlp] [--out runs/erc_levers]

Each dataset's baseline cell is the one erc_levers_run.py trains (its adapters are reused when they are there,
else trained with its recipe, and scored on test by its `eval.py --calibration dev-insample`, whose report holds
the uncalibrated scores too). The test split is then scored twice more: `--calibration dev` with its strength
chosen for weighted F1, and for macro F1. Every choice is made on dev; test is only read. The rows go to
benchmarks/results/calibration_smollm2_cpu.json, with the fits' records (temperature, bias, strengths, the
out-of-fold dev scores of every strength).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import erc_levers_run as levers
from run_common import ROOT, launch_state, run_logged

from llama_erc.benchmarks.provenance import repo_relative
from llama_erc.demo import smollm2_gguf

# eval.py arguments of the scorings beside erc_levers_run.py's own (dev-insample, in eval_test/)
SCORINGS = {"prior-shift (weighted F1)": ["--calibration", "dev", "--calibration_metric", "weighted_f1"],
            "prior-shift (macro F1)": ["--calibration", "dev", "--calibration_metric", "macro_f1"]}


def _scores(d: dict) -> dict:
    return {k: round(100 * d[k], 2) for k in ("accuracy", "weighted_f1", "macro_f1")}


def run_dataset(dataset: str, a: argparse.Namespace, model: str, commands: dict) -> list[dict]:
    levers.run_cell(dataset, "baseline", a, model, commands)  # trains only when its adapters are missing
    cell = Path(repo_relative(a.out)) / dataset / "baseline"
    spec = f"{dataset}={repo_relative(a.data_root / levers.DATA_DIRS[dataset])}"
    insample = json.loads((ROOT / cell / "eval_test" / "report.json").read_text())
    rows = [{"dataset": dataset, "system": "uncalibrated", "split": "test", **_scores(insample["uncalibrated"])}]
    reports = {"dev-insample": insample}
    for i, (name, flags) in enumerate(SCORINGS.items()):
        out = cell / f"eval_test_prior_shift_{i}"
        cmd = [sys.executable, "eval.py", "--run", str(cell / "lora"), "--data", spec, "--split", "test",
               "--batch_size", str(a.eval_batch), "--out_dir", str(out), *flags]
        commands[f"{dataset}/{name}"] = " ".join([repo_relative(cmd[0])] + cmd[1:])
        if not (ROOT / out / "report.json").is_file():
            run_logged(cmd, ROOT / cell / f"eval_prior_shift_{i}.log")
        reports[name] = json.loads((ROOT / out / "report.json").read_text())
    for name, rep in reports.items():
        cal = rep["calibration"]
        offsets = cal["applied_offsets"] if "applied_offsets" in cal else cal["offsets"]  # older in-sample reports
        rows.append({"dataset": dataset, "system": name, "split": "test", **_scores(rep),
                     "applied_offsets": dict(zip(cal["labels"], [round(x, 3) for x in offsets])),
                     "fit": {k: v for k, v in cal.items() if k not in ("labels", "applied_offsets", "offsets")}})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", default="meld,emorynlp")
    p.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "erc_levers")
    p.add_argument("--out-json", type=Path, default=ROOT / "benchmarks" / "results" / "calibration_smollm2_cpu.json")
    levers.add_recipe_args(p)  # erc_levers_run.py's recipe, which run_cell reads
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    launch = launch_state((a.out_json,))
    model, commands, rows = repo_relative(smollm2_gguf()), {}, []
    for dataset in filter(None, a.datasets.split(",")):
        if dataset not in levers.DATA_DIRS:
            raise SystemExit(f"unknown dataset {dataset!r}; known: {', '.join(levers.DATA_DIRS)}")
    for dataset in filter(None, a.datasets.split(",")):
        rows += run_dataset(dataset, a, model, commands)
        result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), **launch,
                  "model": repo_relative(smollm2_gguf()),
                  "recipe": "scripts/erc_levers_run.py baseline: 64 steps x 16 sequences, the final adapters",
                  "commands": commands, "rows": rows, "wall_s_this_invocation": round(time.perf_counter() - t0, 1)}
        a.out_json.parent.mkdir(parents=True, exist_ok=True)
        a.out_json.write_text(json.dumps(result, indent=2) + "\n")  # after every dataset: a cut-short run keeps it
    print(f"\n{'dataset':<10}{'system':<30}{'acc':>7}{'w-F1':>7}{'m-F1':>7}")
    for r in rows:
        print(f"{r['dataset']:<10}{r['system']:<30}{r['accuracy']:>7.2f}{r['weighted_f1']:>7.2f}{r['macro_f1']:>7.2f}")
    print(f"wrote {repo_relative(a.out_json)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
