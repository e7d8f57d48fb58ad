"""A real pretrained LLM on real MELD, on this CPU: SmolLM2-135M-Instruct zero-shot, few-shot and LoRA fine-tuned.

    python scripts/meld_smollm2_run.py [--meld ../shared/data/meld] [--out runs/meld_smollm2]
                                       [--out-json benchmarks/results/meld_smollm2_cpu.json]

Every row is scored on the MELD test split (2,610 utterances) with scikit-learn's metrics (stages run 1, 4, 2, 3):
1. majority class, and TF-IDF + logistic regression (C chosen on dev; scripts/run_common.py);
2. SmolLM2 zero-shot, with the alpaca prompt (DialogueLLM's `### Instruction` layout) and with the model's own
   chat template (`eval.py --model GGUF --prompt_format alpaca|chat`);
3. SmolLM2 few-shot: --n-shots demonstrations drawn once from train, in the chat format;
4. SmolLM2 + LoRA fine-tuned through `torchrun train.py` on the whole MELD train split (--epochs, r=8 on all
   seven linears, packed rows with the shared prompt prefix, --dtype auto; `--base-quant gguf` trains on the GGUF file's
   own blocks instead of weights dequantized at load), evaluated on the whole dev split every
   --eval-every steps, the best adapter by dev weighted F1 kept (best-on-dev selection), then `eval.py` on test.
Nothing is tuned on test. Label-restricted decoding throughout: every prediction is one of the 7 labels.
The JSON holds `rows` ({"system", "split", "accuracy", "weighted_f1", "macro_f1"}), the date, machine, git commit,
configuration, wall times and the commands run; its paths are relative to the repository.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from run_common import ROOT, baselines, git_state, machine, run_logged, scores

from llama_erc.demo.pretrained import smollm2_gguf
from llama_erc.benchmarks.provenance import repo_relative

LORA_TARGETS = "wq,wk,wv,wo,w1,w2,w3"


def eval_cmd(model: str, meld: str, out: Path, a: argparse.Namespace, *, run: Path | None = None,
             prompt_format: str = "", n_shots: int = 0) -> list[str]:
    cmd = [sys.executable, "eval.py", "--data", f"meld={meld}", "--split", "test", "--dtype", a.dtype,
           "--kernels", "off", "--batch_size", str(a.eval_batch), "--max_examples", str(a.test_max_examples),
           "--out_dir", str(out)]
    cmd += ["--run", str(run)] if run else ["--model", model, "--max_len", str(a.max_len)]
    cmd += ["--prompt_format", prompt_format] if prompt_format else []
    return cmd + (["--n_shots", str(n_shots), "--shot_seed", str(a.seed)] if n_shots else [])


def train_cmd(model: str, meld: str, lora: Path, a: argparse.Namespace) -> list[str]:
    return [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=1", "train.py",
            "--model", model, "--train_data", f"meld={meld}", "--dev_data", f"meld={meld}", "--out_dir", str(lora),
            "--prompt_format", a.prompt_format, "--dtype", a.dtype, "--kernels", "off",
            "--activation_checkpointing", "none", "--packing", "--share_prefix", "--context_turns", "2",
            "--max_len", str(a.max_len), "--micro_batch", str(a.micro_batch), "--grad_accum", "1",
            "--epochs", str(a.epochs), "--max_steps", str(a.max_steps), "--lr", str(a.lr),
            "--warmup_steps", str(a.warmup_steps), "--lora_rank", str(a.lora_rank),
            "--lora_alpha", str(2.0 * a.lora_rank), "--lora_targets", LORA_TARGETS, "--lora_dropout", "0.05",
            "--seed", str(a.seed), "--log_every", "10", "--eval_every", str(a.eval_every),
            "--eval_max_examples", str(a.dev_max_examples), "--save_every", str(a.eval_every)] + (
                ["--base_quant", a.base_quant] if a.base_quant != "none" else [])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--meld", type=Path, default=ROOT.parent / "shared" / "data" / "meld")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "meld_smollm2")
    p.add_argument("--out-json", type=Path, default=ROOT / "benchmarks" / "results" / "meld_smollm2_cpu.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp32"),
                   help="auto: bf16 where the CPU has native bf16 matmul, fp32 where bf16 would be emulated")
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--eval-batch", type=int, default=16)
    p.add_argument("--n-shots", type=int, default=3)
    p.add_argument("--prompt-format", default="chat", choices=("alpaca", "chat"), help="of the fine-tuned run")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=0, help="0: epochs decide")
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--eval-every", type=int, default=312)
    p.add_argument("--dev-max-examples", type=int, default=0, help="0: the whole dev split")
    p.add_argument("--test-max-examples", type=int, default=0, help="0: the whole test split (smoke runs only)")
    p.add_argument("--base-quant", default="none", choices=("none", "gguf"),
                   help="gguf: train on the file's own blocks (eval.py reloads the run's base the same way)")
    p.add_argument("--skip", default="", help="comma-separated stages to skip (smoke runs): zero,few,ft")
    a = p.parse_args(argv)
    skip = set(filter(None, a.skip.split(",")))

    out = a.out.resolve()
    shutil.rmtree(out, ignore_errors=True)  # a fresh run: train.py refuses an out_dir that already holds checkpoints
    out.mkdir(parents=True)
    # the commands run from the repository root (run_logged), so repository-relative paths name the same files
    model, meld, rel_out = repo_relative(smollm2_gguf()), repo_relative(a.meld), Path(repo_relative(out))
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
              "git": git_state(), "model": model, "data": meld,
              "config": {k: repo_relative(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
              "commands": {}, "wall_s": {}}
    rows, wall = [], result["wall_s"]

    def save() -> None:  # after every stage, so a run cut short keeps what it measured
        result["rows"] = rows
        a.out_json.parent.mkdir(parents=True, exist_ok=True)
        a.out_json.write_text(json.dumps(result, indent=2) + "\n")

    def llm_row(system: str, stage: str, cmd: list[str], report: Path) -> None:
        result["commands"][stage] = " ".join(cmd[1:] if cmd[0] == sys.executable else cmd)
        wall[stage] = round(run_logged(cmd, out / f"{stage}.log"), 1)
        rows.append({"system": system, "split": "test", **scores(json.loads(report.read_text()))})
        print(f"{system}: {rows[-1]}", flush=True)
        save()

    t0 = time.perf_counter()
    base = baselines(a.meld.resolve())
    wall["baselines"] = round(time.perf_counter() - t0, 1)
    result["n_utterances"] = base.pop("n")
    rows.append({"system": f"majority class ({base['majority']['label']})", "split": "test",
                 **{k: base["majority"][k] for k in ("accuracy", "weighted_f1", "macro_f1")}})
    rows.append({"system": f"TF-IDF + logistic regression (C={base['tfidf_lr']['C']:g}, chosen on dev)",
                 "split": "test", **{k: base["tfidf_lr"][k] for k in ("accuracy", "weighted_f1", "macro_f1")}})
    save()

    if "ft" not in skip:
        lora = rel_out / "lora"
        cmd = train_cmd(model, meld, lora, a)
        result["commands"]["train"] = " ".join([repo_relative(cmd[0])] + cmd[1:])  # no machine path
        # torchrun sets OMP_NUM_THREADS=1 unless it is set: give the one CPU process every core
        wall["train"] = round(run_logged(cmd, out / "train.log", env={"OMP_NUM_THREADS": str(os.cpu_count())}), 1)
        evals = [r for r in map(json.loads, (ROOT / lora / "metrics.jsonl").read_text().splitlines()) if "eval" in r]
        result["dev_evals"] = evals
        result["best_step"] = json.loads((ROOT / lora / "best" / "config.json").read_text())["step"]
        d = lora / "eval_test_meld"
        held = ", GGUF blocks as the base" if a.base_quant == "gguf" else ""
        llm_row(f"SmolLM2-135M-Instruct + LoRA fine-tuned ({a.epochs} epoch, {a.prompt_format} prompt{held}, "
                f"best of {len(evals)} dev evaluations)", "fine_tuned_test", eval_cmd(model, meld, d, a, run=lora),
                ROOT / d / "report.json")
        test = json.loads((ROOT / d / "report.json").read_text())
        result["fine_tuned_test_per_class"] = test["per_class"]
        result["fine_tuned_test_confusion_matrix"] = test["confusion_matrix"]
    if "zero" not in skip:
        for fmt in ("alpaca", "chat"):
            d = rel_out / f"zero_shot_{fmt}"
            llm_row(f"SmolLM2-135M-Instruct zero-shot, {fmt} prompt", f"zero_shot_{fmt}",
                    eval_cmd(model, meld, d, a, prompt_format=fmt), ROOT / d / "report.json")
    if "few" not in skip:
        d = rel_out / "few_shot_chat"
        llm_row(f"SmolLM2-135M-Instruct {a.n_shots}-shot, chat prompt", "few_shot_chat",
                eval_cmd(model, meld, d, a, prompt_format="chat", n_shots=a.n_shots), ROOT / d / "report.json")
    wall["total"] = round(time.perf_counter() - t0, 1)
    result["complete"] = True
    save()
    print(f"\nMELD test\n{'system':<90}{'acc':>7}{'w-F1':>7}{'m-F1':>7}")
    for r in rows:
        print(f"{r['system']:<90}{r['accuracy']:>7.2f}{r['weighted_f1']:>7.2f}{r['macro_f1']:>7.2f}")
    print(f"wrote {repo_relative(a.out_json)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
