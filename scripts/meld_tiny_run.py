"""A measured run on real MELD, on CPU: two baselines and a tiny LLaMA trained from scratch + LoRA.

    python scripts/meld_tiny_run.py [--meld ../shared/data/meld] [--out runs/meld_tiny]
                                    [--out-json benchmarks/results/meld_tiny_cpu.json]

Stages (each timed; every score is on the MELD test split, 2,610 utterances, scikit-learn metrics):
1. baselines trained on MELD train: the majority class, and TF-IDF (word 1-2 grams, sublinear tf) +
   logistic regression on the target utterance's text alone, with C picked on dev weighted F1 from a fixed
   grid (and, for reference, C=1.0 fixed a priori);
2. a sentencepiece tokenizer and a tiny LLaMA pre-trained from scratch on the MELD train transcripts
   (llama_erc.demo.tiny's `transcripts` and `pretrain`; next-token prediction, the emotion labels are NOT shown),
   saved in Meta's layout (params.json + model.safetensors + tokenizer.model);
3. LoRA fine-tuning through the real `train.py` (fp32, kernels off, LoRA on all 7 linears), evaluating on
   the first --eval-max-examples dev utterances and keeping the best adapter by weighted F1; then the real
   `eval.py` on the whole test split with label-restricted decoding.
Nothing is tuned on test. The JSON records the date, machine, git commit, configuration and wall times; its paths
(and the train.py / eval.py commands, which run from the repository root) are relative to the repository.
A tiny from-scratch model is expected to land well below LLaMA-2-7B and may land below TF-IDF.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from run_common import C_FIXED, ROOT, baselines, git_state, machine, run_logged, scores

from llama_erc.data import load_dialogues
from llama_erc.demo import tiny as demo
from llama_erc.benchmarks.provenance import repo_relative


def build_base(meld: Path, out: Path, a: argparse.Namespace) -> dict:
    """llama_erc.demo.tiny's recipe on MELD train: tokenizer, then a tiny LLaMA pre-trained on the transcripts."""
    return demo.build_base(load_dialogues("meld", meld, "train"), out, vocab_size=a.vocab_size, dim=a.dim,
                           n_layers=a.layers, n_heads=a.heads, hidden_dim=a.hidden, steps=a.pretrain_steps,
                           batch=a.pretrain_batch, seq=a.pretrain_seq, lr=a.pretrain_lr, seed=a.seed)


def train_cmd(meld: Path, base: Path, lora: Path, a: argparse.Namespace) -> list[str]:
    return [sys.executable, "train.py", "--model", str(base), "--train_data", f"meld={meld}",
            "--dev_data", f"meld={meld}", "--out_dir", str(lora), "--dtype", "fp32", "--kernels", "off",
            "--activation_checkpointing", "none", "--context_turns", "2", "--max_len", str(a.max_len),
            "--micro_batch", str(a.micro_batch), "--grad_accum", "1", "--epochs", str(a.epochs),
            "--max_steps", str(a.max_steps), "--lr", str(a.lr), "--warmup_steps", str(a.warmup_steps),
            "--lora_rank", str(a.lora_rank), "--lora_alpha", str(2.0 * a.lora_rank),
            "--lora_targets", "wq,wk,wv,wo,w1,w2,w3", "--lora_dropout", "0", "--seed", str(a.seed),
            "--log_every", "50", "--eval_every", str(a.eval_every), "--eval_max_examples", str(a.eval_max_examples),
            "--save_every", "100000"]


def eval_cmd(meld: Path, lora: Path, a: argparse.Namespace) -> list[str]:
    return [sys.executable, "eval.py", "--run", str(lora), "--data", f"meld={meld}", "--split", "test",
            "--dtype", "fp32", "--kernels", "off", "--batch_size", "16", "--max_examples", str(a.test_max_examples),
            "--out_dir", str(lora / "eval_test_meld")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--meld", type=Path, default=ROOT.parent / "shared" / "data" / "meld")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "meld_tiny")
    p.add_argument("--out-json", type=Path, default=ROOT / "benchmarks" / "results" / "meld_tiny_cpu.json")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("tiny LLaMA (pre-trained from scratch)")
    g.add_argument("--vocab-size", type=int, default=2000)
    g.add_argument("--dim", type=int, default=192)
    g.add_argument("--layers", type=int, default=4)
    g.add_argument("--heads", type=int, default=6)
    g.add_argument("--hidden", type=int, default=512)
    g.add_argument("--pretrain-steps", type=int, default=600)
    g.add_argument("--pretrain-batch", type=int, default=16)
    g.add_argument("--pretrain-seq", type=int, default=128)
    g.add_argument("--pretrain-lr", type=float, default=3e-3)
    g = p.add_argument_group("LoRA fine-tuning (train.py) and evaluation (eval.py)")
    g.add_argument("--epochs", type=int, default=3)
    g.add_argument("--max-steps", type=int, default=0, help="0: epochs decide")
    g.add_argument("--micro-batch", type=int, default=16)
    g.add_argument("--lr", type=float, default=3e-3)
    g.add_argument("--warmup-steps", type=int, default=20)
    g.add_argument("--lora-rank", type=int, default=8)
    g.add_argument("--max-len", type=int, default=256)
    g.add_argument("--eval-every", type=int, default=156)
    g.add_argument("--eval-max-examples", type=int, default=300)
    g.add_argument("--test-max-examples", type=int, default=0, help="0: the whole test split (smoke runs only)")
    a = p.parse_args(argv)

    meld, out = a.meld.resolve(), a.out.resolve()
    base, lora = out / "base", out / "lora"
    for d in (base, lora):  # a fresh run: train.py refuses an out_dir that already holds checkpoints
        shutil.rmtree(d, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
              "git": git_state(), "data": repo_relative(a.meld),
              "config": {k: repo_relative(v) if isinstance(v, Path) else v for k, v in vars(a).items()}}
    wall: dict[str, float] = {}
    t_all = time.perf_counter()

    t0 = time.perf_counter()
    base_scores = baselines(meld)
    wall["baselines"] = time.perf_counter() - t0
    print(f"baselines ({wall['baselines']:.0f}s): {json.dumps(base_scores)}", flush=True)

    info = build_base(meld, base, a)
    wall["tokenizer"], wall["pretrain"] = info.pop("tokenizer_s"), info.pop("pretrain_s")
    result["base_model"] = info

    # the commands run from the repository root (_run), so repository-relative paths name the same directories
    rel_meld, rel_base, rel_lora = (Path(repo_relative(d)) for d in (meld, base, lora))
    tcmd, ecmd = train_cmd(rel_meld, rel_base, rel_lora, a), eval_cmd(rel_meld, rel_lora, a)
    wall["lora_train"] = run_logged(tcmd, out / "train.log")
    wall["test_eval"] = run_logged(ecmd, out / "eval.log")
    wall["total"] = time.perf_counter() - t_all

    best = json.loads((lora / "best" / "config.json").read_text())
    evals = [r for r in map(json.loads, (lora / "metrics.jsonl").read_text().splitlines()) if "eval" in r]
    test = json.loads((lora / "eval_test_meld" / "report.json").read_text())
    result["lora"] = {"train_cmd": " ".join(tcmd[1:]), "eval_cmd": " ".join(ecmd[1:]),
                      "best_step": best["step"], "dev_evals": evals,
                      "test_per_class": test["per_class"], "test_confusion_matrix": test["confusion_matrix"]}
    result["test"] = {"n": test["n"], "majority": base_scores["majority"], "tfidf_lr": base_scores["tfidf_lr"],
                      "tfidf_lr_c1": base_scores["tfidf_lr_c1"],
                      "tiny_llama_lora": scores(test)}
    result["n_utterances"] = base_scores.pop("n")
    result["wall_s"] = {k: round(v, 1) for k, v in wall.items()}

    rows = [("majority class", base_scores["majority"], wall["baselines"]),
            (f"TF-IDF + LR (C={base_scores['tfidf_lr']['C']:g}, from dev)", base_scores["tfidf_lr"], None),
            (f"TF-IDF + LR (C={C_FIXED:g}, fixed)", base_scores["tfidf_lr_c1"], None),
            (f"tiny LLaMA {info['n_params'] / 1e6:.1f}M + LoRA", result["test"]["tiny_llama_lora"],
             wall["tokenizer"] + wall["pretrain"] + wall["lora_train"] + wall["test_eval"])]
    print(f"\nMELD test ({test['n']} utterances)\n{'model':<34}{'acc':>8}{'w-F1':>8}{'m-F1':>8}{'wall s':>9}")
    for name, s, w in rows:
        print(f"{name:<34}{s['accuracy']:>8.2f}{s['weighted_f1']:>8.2f}{s['macro_f1']:>8.2f}"
              f"{'' if w is None else f'{w:.0f}':>9}")
    print("wall s: " + ", ".join(f"{k} {v:.0f}" for k, v in wall.items()))
    a.out_json.parent.mkdir(parents=True, exist_ok=True)
    a.out_json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.out_json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
