"""A quantized frozen base against the dense one, side by side on the real SmolLM2-135M-Instruct GGUF.

    python -m llama_erc.benchmarks.base_quant [--steps 8] [--dtypes fp32,auto] [--out results.json]

For each dtype, train.py runs the same LoRA recipe (the demo's: chat prompts, packed rows, LoRA r=8 on all seven
linears, no dropout) for --steps steps twice, with --base_quant none (the file dequantized at load) and
--base_quant gguf (its Q4_1 / Q8_0 blocks kept, dequantized a layer at a time), each in a fresh interpreter.
Reported per run: the loss of every step (with fp32 the two runs must log the same losses, bit for bit), peak
RSS (VmHWM of the training process, the whole run: load, training, saving), RSS after imports, RSS and peak RSS
when the model is built (before the first step), tokens/s of the last logged step, and the base's packed and
dense bytes. Data: the embedded demo set (a fresh clone has it);
--data names another MELD-format directory. Timings on a shared CPU are indicative only; the losses and the
memory are the point.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from llama_erc.benchmarks.provenance import repo_relative, source_commit
from llama_erc.demo import DEMO_DATA
from llama_erc.demo.pretrained import smollm2_gguf

# The child: train.py's main in this interpreter, then its own peak RSS. VmHWM is this process image's high-water
# mark (ru_maxrss would carry the parent's RSS across fork+exec).
_CHILD = """
import json, sys
def status(key):
    return next(int(x.split()[1]) for x in open('/proc/self/status') if x.startswith(key + ':'))
import torch, train
import llama_erc.engine.train as engine_train
base_kb = status('VmRSS')
built = {}
build = engine_train.build_lora_model
def build_and_note(*args, **kwargs):
    out = build(*args, **kwargs)
    built.update(rss_after_build_kb=status('VmRSS'), peak_by_build_kb=status('VmHWM'))
    return out
engine_train.build_lora_model = build_and_note  # the run's own build, noted: load peak vs training peak
rc = train.main(sys.argv[1:])
print('CHILD ' + json.dumps({'rc': rc, 'peak_rss_kb': status('VmHWM'), 'rss_after_imports_kb': base_kb, **built}))
"""


def _recipe(model: str, data: str, out: Path, dtype: str, base_quant: str, steps: int) -> list[str]:
    return ["--model", model, "--train_data", f"meld={data}", "--out_dir", str(out), "--prompt_format", "chat",
            "--context_turns", "2", "--packing", "--share_prefix", "--dtype", dtype, "--kernels", "off",
            "--activation_checkpointing", "none", "--micro_batch", "8", "--grad_accum", "1", "--max_steps",
            str(steps), "--lr", "2e-3", "--warmup_steps", "3", "--lora_rank", "8", "--lora_alpha", "16",
            "--lora_targets", "wq,wk,wv,wo,w1,w2,w3", "--lora_dropout", "0", "--seed", "1234", "--log_every", "1",
            "--save_every", str(steps), "--base_quant", base_quant]


def run_one(model: str, data: str, dtype: str, base_quant: str, steps: int, root: Path) -> dict:
    out = root / f"{dtype}_{base_quant}"
    argv = _recipe(model, data, out, dtype, base_quant, steps)
    env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count())}
    proc = subprocess.run([sys.executable, "-c", _CHILD, *argv], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).resolve().parents[2])
    child = [x for x in proc.stdout.splitlines() if x.startswith("CHILD ")]
    if proc.returncode or not child or json.loads(child[-1][6:])["rc"]:
        raise SystemExit(f"train.py --dtype {dtype} --base_quant {base_quant} failed:\n{proc.stdout[-3000:]}\n"
                         f"{proc.stderr[-3000:]}")
    mem = json.loads(child[-1][6:])
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps_logged = [r for r in records if "loss" in r]
    resolved = json.loads((out / "config.json").read_text())["dtype"]
    return {"dtype": resolved, "base_quant": base_quant, "losses": [r["loss"] for r in steps_logged],
            "peak_rss_mib": round(mem["peak_rss_kb"] / 1024, 1),
            "rss_after_imports_mib": round(mem["rss_after_imports_kb"] / 1024, 1),
            "peak_rss_above_imports_mib": round((mem["peak_rss_kb"] - mem["rss_after_imports_kb"]) / 1024, 1),
            "rss_after_build_mib": round(mem["rss_after_build_kb"] / 1024, 1),
            "peak_rss_by_end_of_build_mib": round(mem["peak_by_build_kb"] / 1024, 1),
            "tokens_per_s_last_step": round(steps_logged[-1]["tokens_per_s"], 1)}


def base_bytes(model: str) -> dict:
    import torch

    from llama_erc.model import load_pretrained
    from llama_erc.model.quant import quant_summary
    return {bq: quant_summary(load_pretrained(model, dtype=torch.bfloat16, base_quant=bq)) for bq in ("none", "gguf")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--dtypes", default="fp32,auto", help="comma-separated: fp32, bf16, auto")
    p.add_argument("--data", type=Path, default=DEMO_DATA)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    model = repo_relative(smollm2_gguf())
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in [d for d in a.dtypes.split(",") if d]:
            for bq in ("none", "gguf"):
                runs.append(run_one(model, str(a.data), dtype, bq, a.steps, Path(tmp)))
                r = runs[-1]
                print(f"{r['dtype']:>5} {bq:>5}: peak RSS {r['peak_rss_mib']:8.1f} MiB ({r['peak_rss_above_imports_mib']:.1f} "
                      f"above imports; after the build {r['rss_after_build_mib']:.1f}, peak by then "
                      f"{r['peak_rss_by_end_of_build_mib']:.1f}), {r['tokens_per_s_last_step']:.0f} tok/s, "
                      f"losses {r['losses']}", flush=True)
    pairs = {}
    for r in runs:
        pairs.setdefault(r["dtype"], {})[r["base_quant"]] = r
    summary = {dt: {"losses_identical": v["none"]["losses"] == v["gguf"]["losses"],
                    "peak_rss_ratio_gguf_over_none": round(v["gguf"]["peak_rss_mib"] / v["none"]["peak_rss_mib"], 3),
                    "peak_rss_saved_mib": round(v["none"]["peak_rss_mib"] - v["gguf"]["peak_rss_mib"], 1)}
               for dt, v in pairs.items()}
    for dt, s in summary.items():
        print(f"{dt}: losses identical {s['losses_identical']}; peak RSS gguf/none {s['peak_rss_ratio_gguf_over_none']}"
              f" ({s['peak_rss_saved_mib']} MiB saved)")
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": source_commit(),
              "machine": {"device": "cpu", "cores": os.cpu_count(), "load_avg_at_start": list(os.getloadavg())},
              "model": model, "data": repo_relative(a.data), "steps": a.steps,
              "recipe": " ".join(_recipe(model, repo_relative(a.data), Path("OUT"), "DTYPE", "BASE_QUANT", a.steps)),
              "base": base_bytes(model), "summary": summary, "runs": runs}
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {a.out}")
    return 0 if all(s["losses_identical"] for dt, s in summary.items() if dt == "fp32") else 1


if __name__ == "__main__":
    sys.exit(main())
