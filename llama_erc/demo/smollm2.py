"""`make demo`: a real pretrained model, SmolLM2-135M-Instruct, zero-shot and LoRA fine-tuned on the bundled demo set.

    python -m llama_erc.demo [--out runs/demo_smollm2]

Three stages, each the project's own entry point (what train.py and eval.py run, started as modules so that
the demo runs from any directory) in a process of its own, as a user would run it:
1. `eval.py --model GGUF` scores the demo test split (107 utterances) with the base model (zero-shot);
2. `torchrun --standalone --nproc_per_node=1 train.py --model GGUF` fine-tunes LoRA adapters on the demo train
   split (packed rows with the shared prompt prefix, dtype auto: bf16 where the CPU has native bf16 matmul,
   else fp32; no dev evaluation: the last adapter is kept);
3. `eval.py --run` scores the same test split with the adapters.
Both evaluations use the same prompt format, context and label-restricted decoding, so the two rows of the table
differ only by the adapters. The demo set (llama_erc/demo/meld_format) is synthetic dialogues in MELD's CSV format
written for this project: the numbers show the pipeline working on a real model, not MELD results.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from llama_erc.demo.pretrained import DEMO_DATA, smollm2_gguf

LORA_TARGETS = "wq,wk,wv,wo,w1,w2,w3"


def run(cmd: list[str]) -> float:
    """Run one stage with its output on the terminal; its wall time in seconds."""
    print("+ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def table(rows: list[tuple[str, dict]]) -> str:
    lines = [f"{'model (demo test split, n=%d)' % rows[0][1]['n']:<44} {'accuracy':>9} {'weighted F1':>12} "
             f"{'macro F1':>9}"]
    lines += [f"{name:<44} {100 * r['accuracy']:>9.2f} {100 * r['weighted_f1']:>12.2f} {100 * r['macro_f1']:>9.2f}"
              for name, r in rows]   # report.json holds fractions
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llama_erc.demo", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs") / "demo_smollm2")
    p.add_argument("--data", type=Path, default=DEMO_DATA)
    p.add_argument("--prompt_format", default="chat", choices=("alpaca", "chat"))
    p.add_argument("--context_turns", default="2")
    p.add_argument("--max_steps", type=int, default=30)
    p.add_argument("--micro_batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup_steps", type=int, default=3)
    p.add_argument("--lora_rank", type=int, default=8)
    p.add_argument("--log_every", type=int, default=5)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp32"),
                   help="auto: bf16 where the CPU has native bf16 matmul, else fp32 (engine/runtime.py)")
    a = p.parse_args(argv)
    try:
        model = str(smollm2_gguf())
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    data = f"meld={a.data}"
    common = ["--data", data, "--split", "test", "--kernels", "off", "--batch_size", "8"]
    zero, lora = a.out / "zero_shot", a.out / "lora"
    evaluate = [sys.executable, "-m", "llama_erc.engine.eval_run"]  # eval.py
    times = {"zero-shot eval": run([*evaluate, "--model", model, "--prompt_format", a.prompt_format,
                                    "--context_turns", a.context_turns, "--dtype", a.dtype, "--out_dir", str(zero),
                                    *common])}
    times["LoRA training"] = run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
         "-m", "llama_erc.engine.train",  # torchrun train.py
         "--model", model, "--train_data", data, "--out_dir", str(lora), "--prompt_format", a.prompt_format,
         "--context_turns", a.context_turns, "--packing", "--share_prefix", "--dtype", a.dtype, "--kernels", "off",
         "--activation_checkpointing", "none", "--micro_batch", str(a.micro_batch), "--grad_accum", "1",
         "--max_steps", str(a.max_steps), "--lr", str(a.lr), "--warmup_steps", str(a.warmup_steps),
         "--lora_rank", str(a.lora_rank), "--lora_alpha", str(2 * a.lora_rank), "--lora_targets", LORA_TARGETS,
         "--lora_dropout", "0", "--seed", str(a.seed), "--log_every", str(a.log_every),
         "--save_every", str(a.max_steps)])
    times["fine-tuned eval"] = run([*evaluate, "--run", str(lora), "--dtype", a.dtype, "--out_dir",
                                    str(lora / "eval_test_meld"), *common])
    rows = [("SmolLM2-135M-Instruct zero-shot", json.loads((zero / "report.json").read_text())),
            (f"+ LoRA, {a.max_steps} steps x {a.micro_batch} examples",
             json.loads((lora / "eval_test_meld" / "report.json").read_text()))]
    print("\n" + table(rows))
    print("wall: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()) + f"; reports in {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
