"""Peak RSS of load_pretrained on a synthetic ~1B-parameter checkpoint, against the weights' bytes.

    python -m llama_erc.benchmarks.load_rss [--layers 18] [--dir DIR] [--out rss.json] [--also-hf] [--also-fp32]

Writes form 1 (params.json + Meta-named bf16 safetensors shards + index) with random weights, then loads it
in a FRESH interpreter (so nothing from writing it is resident) with load_pretrained(dtype=bfloat16).
After loading, the child reads one element per 4 KiB page of every weight, so every weight byte is
resident (a zero-copy load maps the files lazily; measuring only the load itself would look free).

    peak = VmHWM (after load + touch) - RSS of the child after `import torch, llama_erc.model.load`
    ratio = peak / bytes of the loaded weights          target: < 1.2

VmHWM (/proc/self/status) is the high-water RSS of this process image. ru_maxrss is reported too, but
Linux carries it across fork+exec, so in a child it starts at the parent's RSS when it spawned us (the
parent has just written a 2 GB checkpoint): it overstates the load's peak.

--also-hf also writes form 3 (HF names, rotate-half q/k) and measures it (q/k un-permute: owned reads);
--also-fp32 measures form 1 loaded as fp32 (a cast: every tensor read into owned memory, then cast).

--gguf measures the real SmolLM2-135M-Instruct GGUF instead (llama_erc.demo.smollm2_gguf(): Q4_1 linears,
Q8_0 embedding), loaded as bf16 and as fp32, each in a fresh interpreter; nothing is written. Every GGUF
tensor is dequantized into owned memory and the file is memory-mapped while loading, so the bound is
    peak <= 1.1 x the loaded weights' bytes + the file's size        (reported as gguf_bound_ratio <= 1)
The child imports the gguf package before its baseline, like torch: module code is not the load's memory.
"""
from __future__ import annotations

import argparse
import importlib
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GIB = 2**30


def _status(field: str) -> int:
    """A /proc/self/status memory field (VmRSS, VmHWM, RssAnon, RssFile) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _rss() -> int:
    return _status("VmRSS")


def _synthetic_config(n_layers: int):
    from llama_erc.model.config import ModelConfig
    return ModelConfig(dim=2048, n_layers=n_layers, n_heads=16, n_kv_heads=16, hidden_dim=5632,
                       vocab_size=32000, max_seq_len=4096)


def write_synthetic(dst: Path, n_layers: int, hf: bool = False, shard_bytes: int = GIB) -> int:
    """Random bf16 weights as form 1 (or form 3 when hf), streamed one shard at a time. Returns n_params."""
    import torch
    from safetensors.torch import save_file

    from llama_erc.model.config import to_meta_params
    from llama_erc.model.hf_keys import meta_to_hf_key, permute_to_hf, qk_heads
    from llama_erc.model.llama import Transformer

    cfg = _synthetic_config(n_layers)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Transformer(cfg).state_dict().items()}
    dst.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    shards, cur, used = [], {}, 0
    for k, shape in shapes.items():
        t = torch.randn(shape, generator=g, dtype=torch.bfloat16) * 0.02
        if hf:
            heads = qk_heads(k, cfg.n_heads, cfg.n_kv_heads)
            t = t if heads is None else permute_to_hf(t, heads).contiguous()
            k = meta_to_hf_key(k)
        cur[k] = t
        used += t.numel() * 2
        if used >= shard_bytes:
            shards.append(_flush(cur, dst, len(shards), save_file))
            cur, used = {}, 0
    if cur:
        shards.append(_flush(cur, dst, len(shards), save_file))
    weight_map = {k: name for name, keys in shards for k in keys}
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    if hf:
        (dst / "config.json").write_text(json.dumps({
            "architectures": ["LlamaForCausalLM"], "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
            "intermediate_size": cfg.hidden_dim, "vocab_size": cfg.vocab_size, "rms_norm_eps": cfg.norm_eps,
            "rope_theta": cfg.rope_theta, "max_position_embeddings": cfg.max_seq_len}))
    else:
        (dst / "params.json").write_text(json.dumps(to_meta_params(cfg)))
    return cfg.n_params


def _flush(tensors: dict, dst: Path, i: int, save_file) -> tuple[str, list[str]]:
    name = f"model-{i + 1:05d}.safetensors"
    save_file(tensors, str(dst / name), metadata={"format": "pt"})
    return name, list(tensors)


def child(path: str, dtype_name: str) -> dict:
    """Runs in the fresh interpreter: baseline, load, touch every page, report."""
    import gc

    import torch

    from llama_erc.model.load import load_pretrained
    if path.endswith(".gguf"):  # imported by the loader; its module code is not the load's memory
        importlib.import_module("gguf")
    gc.collect()
    baseline = _rss()
    t0 = time.perf_counter()
    model = load_pretrained(path, dtype=getattr(torch, dtype_name))
    load_s = time.perf_counter() - t0
    rss_after_load = _rss() - baseline
    total = 0.0
    with torch.no_grad():
        for p in model.parameters():  # one element per 4 KiB page: every page resident, no big temporary
            total += p.reshape(-1)[:: 4096 // p.element_size()].float().sum().item()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    peak = _status("VmHWM") - baseline
    ru_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline  # KiB on Linux
    maps = _file_maps()
    mapped = sum(p.numel() * p.element_size() for p in model.parameters()
                 if any(lo <= p.data_ptr() < hi for lo, hi in maps))
    return {"path": path, "dtype": dtype_name, "n_params": sum(p.numel() for p in model.parameters()),
            "weights_bytes": weights, "baseline_rss_bytes": baseline, "rss_after_load_bytes": rss_after_load,
            "rss_after_touch_bytes": _rss() - baseline, "rss_file_bytes": _status("RssFile"),
            "rss_anon_bytes": _status("RssAnon"), "peak_rss_bytes": peak, "ratio": peak / weights,
            "ru_maxrss_minus_baseline_bytes": ru_maxrss,
            "mmap_backed_weight_bytes": mapped, "load_seconds": round(load_s, 3), "checksum": total}


def _file_maps() -> list[tuple[int, int]]:
    """Address ranges of mapped .safetensors/.pth/.gguf files: parameters living there are zero-copy views."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            if line.rstrip().endswith((".safetensors", ".pth", ".gguf")):
                lo, hi = line.split()[0].split("-")
                out.append((int(lo, 16), int(hi, 16)))
    return out


def _measure(path: Path, dtype_name: str) -> dict:
    # a fresh interpreter: the writer's tensors and allocator caches must not count
    cmd = [sys.executable, "-m", "llama_erc.benchmarks.load_rss", "--child", str(path), "--load-dtype", dtype_name]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def measure_gguf() -> list[dict]:
    """Peak RSS of load_pretrained(smollm2_gguf()) as bf16 and fp32, against the weights and the file size."""
    from llama_erc.demo.pretrained import smollm2_gguf
    path = smollm2_gguf()
    file_bytes = path.stat().st_size
    runs = []
    for dt in ("bfloat16", "float32"):
        r = {"form": "gguf", "file_bytes": file_bytes, **_measure(path, dt)}
        r["gguf_bound_ratio"] = r["peak_rss_bytes"] / (1.1 * r["weights_bytes"] + file_bytes)
        runs.append(r)
        print(f"gguf (SmolLM2-135M Q4_1) -> {dt:8s}: file {file_bytes / 2**20:.1f} MiB, weights "
              f"{r['weights_bytes'] / 2**20:.1f} MiB, peak RSS {r['peak_rss_bytes'] / 2**20:.1f} MiB = "
              f"{r['ratio']:.2f} x weights, {r['gguf_bound_ratio']:.2f} x (1.1 weights + file); after load "
              f"{r['rss_after_load_bytes'] / 2**20:.1f} MiB; load {r['load_seconds']:.1f}s")
    return runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=18, help="18 layers of dim 2048: ~1.06B parameters")
    p.add_argument("--dir", type=Path, help="where to write the checkpoint(s) (default: a temp dir, removed)")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--also-hf", action="store_true", help="also measure the same weights in HF layout")
    p.add_argument("--also-fp32", action="store_true", help="also measure form 1 loaded with a cast to fp32")
    p.add_argument("--gguf", action="store_true", help="measure the real SmolLM2 GGUF (bf16 and fp32) instead")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--load-dtype", default="bfloat16", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.load_dtype)))
        return 0
    if args.gguf:
        runs = measure_gguf()
        if args.out:
            args.out.write_text(json.dumps({"runs": runs, "target_gguf_bound_ratio": 1.0}, indent=2) + "\n")
        return 0 if all(r["gguf_bound_ratio"] <= 1.0 for r in runs) else 1
    root = args.dir or Path(tempfile.mkdtemp(prefix="rss_ckpt_"))
    try:
        runs = []
        t0 = time.perf_counter()
        n = write_synthetic(root / "meta_st", args.layers)
        print(f"wrote {n / 1e9:.2f}B-parameter bf16 checkpoint in {time.perf_counter() - t0:.0f}s")
        jobs = [("meta-safetensors", root / "meta_st", "bfloat16")]
        if args.also_fp32:
            jobs.append(("meta-safetensors", root / "meta_st", "float32"))
        if args.also_hf:
            write_synthetic(root / "hf", args.layers, hf=True)
            jobs.append(("hf-safetensors", root / "hf", "bfloat16"))
        for form, path, dt in jobs:
            r = {"form": form, **_measure(path, dt)}
            runs.append(r)
            print(f"{form:17s} -> {dt:8s}: weights {r['weights_bytes'] / GIB:.3f} GiB, peak RSS "
                  f"{r['peak_rss_bytes'] / GIB:.3f} GiB, ratio {r['ratio']:.3f} (after load, before touch "
                  f"{r['rss_after_load_bytes'] / GIB:.3f} GiB; mmap-backed {r['mmap_backed_weight_bytes'] / GIB:.3f}"
                  f" GiB; load {r['load_seconds']:.1f}s)")
        if args.out:
            args.out.write_text(json.dumps({"runs": runs, "target_ratio": 1.2}, indent=2) + "\n")
        return 0 if all(r["ratio"] < 1.2 for r in runs) else 1
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
