"""Which ERC levers pay at 135M: SmolLM2-135M-Instruct + LoRA on MELD and EmoryNLP, each lever against the baseline.

    python scripts/erc_levers_run.py --datasets meld,emorynlp --systems baseline,retrieval,...
    python scripts/erc_levers_run.py --collect          # rebuild the results file from what has run

The baseline is the recipe of benchmarks/results/meld_smollm2_cpu.json (chat prompt, 2 previous turns, LoRA r=8 on
all seven linears, packed rows with the shared prefix, --dtype auto: bf16 where the CPU has native bf16, lr 1e-3)
under a fixed training budget that every row shares: --steps optimizer steps of --micro-batch sequences (64 x 16 =
1,024 sequences by default, about a tenth of a MELD epoch), with no dev evaluation during training (the final
adapters are evaluated). A speaker
warm-up adds its own --warmup-stage-steps before that budget, counted in its train_tokens.

Each (dataset, system) cell runs in <out>/<dataset>/<system>/: train.py, then one `eval.py --split test
--calibration dev-insample` (what `--calibration dev` was when this study ran), which fits the label offsets on the
whole dev split (stored beside the adapters, with the
dev scores before and after) and scores the whole test split with and without them. So every system gives four
rows: dev and test, as trained and "+ dev calibration" (its dev row is in-sample: the offsets were fit there).
A finished stage is not rerun; delete the cell's directory to redo it. Nothing is chosen on test: `best` is the
system with the highest dev weighted F1 averaged over the datasets it ran on (calibrated rows use their in-sample
dev score, which favours them; --best overrides the choice).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from run_common import ROOT, launch_state, run_logged, write_results

from llama_erc.demo.pretrained import smollm2_gguf
from llama_erc.benchmarks.provenance import repo_relative

LORA_TARGETS = "wq,wk,wv,wo,w1,w2,w3"
DATA_DIRS = {"meld": "meld", "emorynlp": "emorynlp/meld_repo_csv"}  # under ../shared/data (see their READMEs)

# system -> (train.py flags on top of the baseline recipe, whether it has a speaker warm-up stage first)
SYSTEMS: dict[str, tuple[list[str], bool]] = {
    "baseline": ([], False),
    "history-5": (["--context_turns", "5"], False),
    "history-12": (["--context_turns", "12"], False),
    "retrieval": (["--retrieval", "tfidf"], False),
    "aux-impact": (["--aux_impact", "0.1"], False),
    "speaker-warmup": ([], True),
}
CALIBRATED = " + dev calibration"


def recipe(model: str, spec: str, out: Path, a: argparse.Namespace, steps: int) -> list[str]:
    return [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=1", "train.py",
            "--model", model, "--train_data", spec, "--out_dir", str(out), "--prompt_format", "chat",
            "--dtype", a.dtype, "--kernels", "off", "--activation_checkpointing", "none", "--packing",
            "--share_prefix", "--context_turns", "2", "--max_len", str(a.max_len), "--micro_batch",
            str(a.micro_batch), "--grad_accum", "1", "--max_steps", str(steps), "--lr", str(a.lr),
            "--warmup_steps", str(max(1, steps // 10)), "--lora_rank", "8", "--lora_alpha", "16",
            "--lora_targets", LORA_TARGETS, "--lora_dropout", "0.05", "--seed", str(a.seed), "--log_every", "8",
            "--save_every", str(steps)]


def system_flags(name: str) -> tuple[list[str], bool]:
    """A system is one of SYSTEMS or several joined by '+', e.g. retrieval+history-5."""
    flags, warmup = [], False
    for part in name.split("+"):
        if part not in SYSTEMS:
            raise SystemExit(f"unknown system {part!r}; known: {', '.join(SYSTEMS)} (join with '+')")
        flags += SYSTEMS[part][0]
        warmup |= SYSTEMS[part][1]
    return flags, warmup


def done_training(out: Path, steps: int) -> bool:
    return (ROOT / out / "checkpoints" / f"step_{steps:07d}" / "adapters.safetensors").is_file()


def run_cell(dataset: str, system: str, a: argparse.Namespace, model: str, commands: dict) -> None:
    data = repo_relative(a.data_root / DATA_DIRS[dataset])
    spec = f"{dataset}={data}"
    cell = Path(repo_relative(a.out)) / dataset / system
    (ROOT / cell).mkdir(parents=True, exist_ok=True)
    flags, warmup = system_flags(system)
    env = {"OMP_NUM_THREADS": str(os.cpu_count())}  # torchrun would set 1: give the one process every core
    cmds = {}
    lora = cell / "lora"
    if warmup:
        stage = cell / "speaker"
        cmd = recipe(model, spec, stage, a, a.warmup_stage_steps) + ["--task", "speaker"]
        cmds["speaker_stage"] = cmd
        if not done_training(stage, a.warmup_stage_steps):
            run_logged(cmd, ROOT / cell / "speaker.log", env=env)
        flags = flags + ["--init_adapters", str(stage)]
    cmd = recipe(model, spec, lora, a, a.steps) + flags  # later flags win in argparse
    cmds["train"] = cmd
    if not done_training(lora, a.steps):
        run_logged(cmd, ROOT / cell / "train.log", env=env)
    cmd = [sys.executable, "eval.py", "--run", str(lora), "--data", spec, "--split", "test", "--calibration",
           "dev-insample", "--batch_size", str(a.eval_batch), "--out_dir", str(cell / "eval_test")]
    cmds["eval"] = cmd
    if not (ROOT / cell / "eval_test" / "report.json").is_file():
        run_logged(cmd, ROOT / cell / "eval.log")
    commands[f"{dataset}/{system}"] = {k: " ".join([repo_relative(c[0])] + c[1:]) for k, c in cmds.items()}


def _train_tokens(run: Path) -> int:
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return max(r["tokens"] for r in records if "tokens" in r)


def _scores(d: dict) -> dict:
    return {k: round(100 * d[k], 2) for k in ("accuracy", "weighted_f1", "macro_f1")}


def cell_rows(dataset: str, system: str, out: Path) -> list[dict]:
    cell = out / dataset / system
    report_file = cell / "eval_test" / "report.json"
    if not report_file.is_file():
        return []
    rep = json.loads(report_file.read_text())
    cal = rep["calibration"]
    erc_tokens = _train_tokens(cell / "lora")
    tokens = erc_tokens + (_train_tokens(cell / "speaker") if (cell / "speaker").is_dir() else 0)
    run = json.loads((cell / "lora" / "config.json").read_text())
    sequences = run["max_steps"] * run["micro_batch"] * run["grad_accum"]
    # tokens per sequence of the ERC stage: what a longer history or a retrieved demonstration costs
    base = {"dataset": dataset, "train_tokens": tokens, "tokens_per_train_sequence": round(erc_tokens / sequences, 1)}
    return [
        {**base, "system": system, "split": "dev", **_scores(cal["dev_before"])},
        {**base, "system": system, "split": "test", **_scores(rep["uncalibrated"])},
        {**base, "system": system + CALIBRATED, "split": "dev", **_scores(cal["dev_after"]), "in_sample": True},
        {**base, "system": system + CALIBRATED, "split": "test", **_scores(rep)},
    ]


def choose_best(rows: list[dict]) -> str:
    """The system with the highest dev weighted F1 averaged over its datasets, among those that ran on every
    dataset the baseline ran on (never a test number)."""
    datasets = {r["dataset"] for r in rows if r["system"] == "baseline"}
    dev: dict[str, dict[str, float]] = {}
    for r in rows:
        if r["split"] == "dev":
            dev.setdefault(r["system"], {})[r["dataset"]] = r["weighted_f1"]
    full = {s: sum(v.values()) / len(v) for s, v in dev.items() if set(v) >= datasets}
    return max(sorted(full), key=lambda s: full[s])


def collect(a: argparse.Namespace, commands: dict, t0: float, launch: dict) -> dict:
    """Rebuild the results file from every cell under a.out. launch: run_common.launch_state() of this invocation."""
    out = ROOT / repo_relative(a.out)
    rows = []
    for dataset in sorted(p.name for p in out.iterdir() if p.is_dir()) if out.is_dir() else []:
        for system in sorted(p.name for p in (out / dataset).iterdir() if p.is_dir()):
            rows += cell_rows(dataset, system, out)
    old = json.loads(a.out_json.read_text()) if a.out_json.is_file() else {}
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), **launch,
        "model": repo_relative(smollm2_gguf()),
        "budget": {"optimizer_steps": a.steps, "sequences_per_step": a.micro_batch,
                   "speaker_warmup_stage_steps": a.warmup_stage_steps,
                   "note": "the same for every row; the final adapters are evaluated (no selection during "
                           "training); train_tokens counts every training sequence's tokens, warm-up stage "
                           "included"},
        "config": {k: repo_relative(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
        "systems": {name: " ".join(flags) + (" (after a --task speaker stage)" if warm else "")
                    for name, (flags, warm) in SYSTEMS.items()},
        "commands": {**old.get("commands", {}), **commands},
        "baseline": "baseline",
        "best": a.best or (choose_best(rows) if rows else ""),
        "best_chosen_by": "given (--best)" if a.best else "highest mean dev weighted F1 over the datasets",
        "rows": rows,
    }
    return write_results(result, a.out_json, a.notes, t0)


def print_table(result: dict) -> None:
    print(f"\n{'dataset':<10}{'system':<44}{'split':<6}{'acc':>7}{'w-F1':>7}{'m-F1':>7}{'tokens':>10}")
    for r in result["rows"]:
        print(f"{r['dataset']:<10}{r['system']:<44}{r['split']:<6}{r['accuracy']:>7.2f}{r['weighted_f1']:>7.2f}"
              f"{r['macro_f1']:>7.2f}{r['train_tokens']:>10}")
    print(f"best (by dev): {result['best']}")


def add_recipe_args(p: argparse.ArgumentParser) -> None:
    """The cell recipe's flags (what run_cell and recipe read), shared with scripts/calibration_run.py."""
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--warmup-stage-steps", type=int, default=16)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--eval-batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp32"),
                   help="auto: bf16 where the CPU has native bf16 matmul, fp32 where bf16 would be emulated")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", default="meld,emorynlp")
    p.add_argument("--systems", default="baseline", help=f"comma-separated; each one of {', '.join(SYSTEMS)} or "
                                                         "several joined by '+'")
    p.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "erc_levers")
    p.add_argument("--out-json", type=Path, default=ROOT / "benchmarks" / "results" / "erc_levers_smollm2_cpu.json")
    p.add_argument("--notes", type=Path, default=ROOT / "benchmarks" / "results" / "erc_levers_notes.json",
                   help="a JSON file of remarks copied into the results (if present)")
    add_recipe_args(p)
    p.add_argument("--best", default="", help="name the best system instead of choosing it by dev")
    p.add_argument("--collect", action="store_true", help="only rebuild the results file from finished cells")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    launch = launch_state((a.out_json,))
    model, commands = repo_relative(smollm2_gguf()), {}
    if not a.collect:
        for dataset in filter(None, a.datasets.split(",")):
            if dataset not in DATA_DIRS:
                raise SystemExit(f"unknown dataset {dataset!r}; known: {', '.join(DATA_DIRS)}")
            for system in filter(None, a.systems.split(",")):
                system_flags(system)  # unknown names fail before any run starts
        for dataset in filter(None, a.datasets.split(",")):
            for system in filter(None, a.systems.split(",")):
                run_cell(dataset, system, a, model, commands)
                collect(a, commands, t0, launch)  # after every cell, so a cut-short queue keeps what it measured
    result = collect(a, commands, t0, launch)
    print_table(result)
    print(f"wrote {repo_relative(a.out_json)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
