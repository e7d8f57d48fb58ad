"""bench.py's report: the JSON (every system's rates and memory, the ratios against the HF + PEFT baseline, the
recipe estimate, eval throughput, provenance) and its Markdown table. Written after every system, so a run cut
short by a time limit still leaves what it measured."""
from __future__ import annotations

import platform
from dataclasses import asdict
from pathlib import Path

import torch

from llama_erc.benchmarks.provenance import path_label, repo_relative, source_commit, source_dirty

BASELINE = "hf_peft_bf16"
RECIPE_EXAMPLES, RECIPE_EPOCHS = 22_700, 5  # DialogueLLM: MELD + IEMOCAP + EmoryNLP train sets, 5 epochs


def _overhead(r: dict) -> float | None:
    """Peak memory above the resident model (weights, adapters): what training itself costs, GB."""
    return None if r["peak_memory_gb"] is None else r["peak_memory_gb"] - r["resident_gb_at_start"]


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def markdown(report: dict) -> str:
    c = report["config"]
    lines = [f"# bench.py: {report['mode']} mode on {report['device']}", "",
             f"{report['date']} · commit {report['commit']}{' (dirty)' if report['dirty'] else ''} · "
             f"torch {report['torch']} · model {c['model']} {c['dtype']} · micro-batch {c['micro_batch']} · "
             f"LoRA r={c['lora_rank']} on {','.join(c['lora_targets'])} · checkpointing {c['checkpointing']} · "
             f"ours: {', '.join(c['variants'])} (kernels {c['kernels']}) · "
             f"matmul {report['matmul_tflops']:.3g} TFLOP/s", ""]
    if report["device_type"] == "cpu":
        lines += [f"**CPU run of the harness ({report['model_name']}, {report['n_params']:,} parameters, on "
                  f"{report['device']}): not a performance measurement.**", ""]
    if not report["complete"]:
        lines += ["**Partial report: the run stopped before every system had run.**", ""]
    fmt = lambda v, f: "n/a" if v is None else format(v, f)  # noqa: E731
    lines += ["| system | step (ms) | tokens/s | supervised tokens/s | MFU | peak alloc (GB) | peak reserved (GB) |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in report["systems"].items():
        lines.append(f"| {name} | {r['step_s'] * 1e3:.1f} | {r['tokens_per_s']:.0f} | "
                     f"{r['supervised_tokens_per_s']:.1f} | {100 * r['mfu']:.1f}% | {fmt(r['peak_memory_gb'], '.2f')} "
                     f"| {fmt(r['peak_reserved_gb'], '.2f')} |")
    lines.append("")
    for name, err in report["failed"].items():
        lines.append(f"{name}: FAILED, {err}")
    for name, r in report["ratios"].items():
        lines.append(f"{name}: speedup {fmt(r['speedup'], '.2f')}x (tokens/s), memory ratio "
                     f"{fmt(r['memory_ratio'], '.2f')} (peak allocated; above the resident weights: "
                     f"{fmt(r['overhead_ratio'], '.2f')})")
    lines.append(f"headline (fastest of ours): {report['headline']}")
    if report["recipe_minutes"]:
        lines.append("DialogueLLM recipe estimate (22,700 examples x 5 epochs at the measured tokens/s): " + ", ".join(
            f"{k} {v:.1f} min" for k, v in report["recipe_minutes"].items()))
    if report["eval"]:
        e = report["eval"]
        lines += ["", "| eval | utterances/s |", "|---|---:|",
                  f"| {e.get('ours_system', 'ours')}, label-restricted | {fmt(e.get('ours_utt_per_s'), '.2f')} |"]
        if "ours_graphs_utt_per_s" in e:
            lines.append(f"| {e['ours_graphs_system']}, label-restricted, CUDA graphs | "
                         f"{fmt(e['ours_graphs_utt_per_s'], '.2f')} |")
        lines += [f"| HF generate, 4 beams + string match | {fmt(e.get('hf_utt_per_s'), '.2f')} |",
                  "", f"eval speedup: {fmt(e.get('speedup'), '.1f')}"
                  + (f" (CUDA graphs: {fmt(e.get('graphs_speedup'), '.1f')})" if "ours_graphs_utt_per_s" in e else "")
                  + " · HF outputs naming a label: "
                  f"{fmt(e.get('hf_matched_fraction'), '.2f')} (random weights name none)"]
    return "\n".join(lines) + "\n"


def build_report(args, rt, mcfg, batches, runs, systems, failed, evals, peak_tflops, date: str,
                 complete: bool, lora_targets: tuple[str, ...]) -> dict:
    """The JSON report from what has been measured so far (written after every system, so a run cut short by a
    time limit still leaves the systems it finished)."""
    device = rt.device
    evals = {**evals, "speedup": _ratio(evals.get("ours_utt_per_s"), evals.get("hf_utt_per_s")),
             **({"graphs_speedup": _ratio(evals["ours_graphs_utt_per_s"], evals.get("hf_utt_per_s"))}
                if "ours_graphs_utt_per_s" in evals else {})} if evals else None
    ours_names = [n for n, v in runs if v is not None and n in systems]
    headline = max(ours_names, key=lambda n: systems[n]["tokens_per_s"], default=None)
    ratios = {f"{o} vs {h}": {"speedup": _ratio(systems[o]["tokens_per_s"], systems[h]["tokens_per_s"]),
                              "memory_ratio": _ratio(systems[o]["peak_memory_gb"], systems[h]["peak_memory_gb"]),
                              "overhead_ratio": _ratio(_overhead(systems[o]), _overhead(systems[h]))}
              for o in ours_names for h in systems if h not in ours_names}
    all_seqs = [s for b in batches for s in b]
    mean_len = sum(len(s.ids) for s in all_seqs) / len(all_seqs)
    recipe = ({n: RECIPE_EXAMPLES * RECIPE_EPOCHS * mean_len / r["tokens_per_s_aggregate"] / 60
               for n, r in systems.items()} if args.mode == "erc" else {})
    padded = sum(max(len(s.ids) for s in b) * len(b) for b in batches)
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or
                                                                                     platform.machine()),
        "device_type": device.type, "mode": args.mode, "commit": source_commit(),
        "dirty": source_dirty(), "date": date,
        "torch": torch.__version__, "complete": complete,
        "model_name": path_label(args.model) if Path(args.model).is_dir() else args.model, "n_params": mcfg.n_params,
        "config": {**{k: v for k, v in vars(args).items() if k not in ("systems", "variants")},
                   **{k: getattr(args, k) and repo_relative(getattr(args, k)) for k in ("meld", "tokenizer", "out")},
                   "model": repo_relative(args.model) if Path(args.model).is_dir() else args.model,
                   "systems": list(args.systems), "variants": [v.spec for v in args.variants],
                   "lora_targets": list(lora_targets), "model_config": asdict(mcfg)},
        "matmul_tflops": peak_tflops,
        "batches": {"n_steps": len(batches), "mean_tokens_per_example": mean_len,
                    "mean_supervised_per_example": sum(s.n_supervised for s in all_seqs) / len(all_seqs),
                    "padding_fraction_right_padded": 1 - len(all_seqs) * mean_len / padded},
        "systems": systems, "failed": failed, "baseline": BASELINE, "headline": headline,
        "speedup": ratios.get(f"{headline} vs {BASELINE}", {}).get("speedup"),
        "memory_ratio": ratios.get(f"{headline} vs {BASELINE}", {}).get("memory_ratio"),
        "ratios": ratios, "recipe_minutes": recipe, "eval": evals,
    }
