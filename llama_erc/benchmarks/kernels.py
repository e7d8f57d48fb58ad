"""Kernel benchmark: Triton vs eager PyTorch (the reference ops) vs torch.compile of the reference.

    python -m llama_erc.benchmarks.kernels [--out results.json] [--reps 100] [--compile auto|on|off] [--smoke]

Times forward, backward and forward+backward of each op at LLaMA-2-7B training shapes (8 x 512 tokens, hidden
4096, FFN 11008, 32 heads x 128) in bf16, with inputs that require grad as in training. The RMSNorm weight is
frozen as under LoRA ("rms_norm"); "rms_norm+dw" also trains it.
Timing: on CUDA, CUDA events around each call, the L2 cache flushed before each (a 256 MB write), the median
of --reps runs; backward alone is torch.autograd.grad on a retained graph. On CPU it runs a tiny smoke size
with wall-clock timing (under the interpreter when TRITON_INTERPRET=1), without torch.compile by default.
GB/s counts the bytes the op must move, each input read once and each output written once (saved
intermediates such as rstd are not counted), for every implementation alike; "% copy" divides by the
device-to-device copy bandwidth measured here (bytes read + written by a large tensor copy).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import triton

from llama_erc.benchmarks.provenance import source_commit
from llama_erc.kernels import REFERENCE, apply_rope, rms_norm, swiglu

FULL = dict(tokens=(8, 512), dim=4096, ffn=11008, heads=32, head_dim=128)
SMOKE = dict(tokens=(2, 8), dim=64, ffn=176, heads=4, head_dim=16)
FLUSH_BYTES = 256 << 20  # larger than any GPU's L2 (50 MB on H100), so every run reads from HBM


def _cases(shape: dict, dtype: torch.dtype, device: str) -> list[dict]:
    """One dict per op: its inputs, the tensors it differentiates, and the bytes each pass must move."""
    B, T = shape["tokens"]
    D, Fd, H, Dh = shape["dim"], shape["ffn"], shape["heads"], shape["head_dim"]
    M, e = B * T, torch.tensor([], dtype=dtype).element_size()
    g = torch.Generator().manual_seed(0)

    def rnd(*s, grad=True, dt=dtype):
        return torch.randn(*s, generator=g).to(device=device, dtype=dt).requires_grad_(grad)

    cos, sin = REFERENCE.rope_cos_sin(torch.arange(T, device=device), Dh)  # (T, Dh/2) fp32
    x, w_frozen, w = rnd(M, D), rnd(D, grad=False), rnd(D)
    gate, up = rnd(M, Fd), rnd(M, Fd)
    q = rnd(B, T, H, Dh)
    return [
        dict(op="rms_norm", shape=f"{M}x{D}", args=(x, w_frozen, 1e-5), wrt=(x,), fns=(rms_norm, REFERENCE.rms_norm),
             fwd_bytes=2 * M * D * e + D * e, bwd_bytes=3 * M * D * e + D * e),  # x, w -> y; dy, x, w -> dx
        dict(op="rms_norm+dw", shape=f"{M}x{D}", args=(x, w, 1e-5), wrt=(x, w), fns=(rms_norm, REFERENCE.rms_norm),
             fwd_bytes=2 * M * D * e + D * e, bwd_bytes=3 * M * D * e + 2 * D * e),  # ... -> dx, dw
        dict(op="swiglu", shape=f"{M}x{Fd}", args=(gate, up), wrt=(gate, up), fns=(swiglu, REFERENCE.swiglu),
             fwd_bytes=3 * M * Fd * e, bwd_bytes=5 * M * Fd * e),  # g, u -> y; dy, g, u -> dg, du
        dict(op="rope", shape=f"{B}x{T}x{H}x{Dh}", args=(q, cos, sin), wrt=(q,), fns=(apply_rope, REFERENCE.apply_rope),
             fwd_bytes=2 * M * H * Dh * e + 2 * T * Dh // 2 * 4, bwd_bytes=2 * M * H * Dh * e + 2 * T * Dh // 2 * 4),
    ]


def _timer(device: str, reps: int, warmup: int) -> Callable[[Callable[[], object]], float]:
    """Returns time_ms(fn): median milliseconds of one call of fn."""
    if device == "cuda":
        flush = torch.empty(FLUSH_BYTES, dtype=torch.int8, device=device)

        def time_cuda(fn):
            for _ in range(warmup):
                fn()
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
            for start, end in events:
                flush.zero_()  # evict the inputs from L2; the GPU is busy here while the CPU queues fn
                start.record()
                fn()
                end.record()
            torch.cuda.synchronize()
            return statistics.median(s.elapsed_time(e) for s, e in events)
        return time_cuda

    def time_wall(fn):
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    return time_wall


def copy_bandwidth_gbs(device: str, nbytes: int, time_ms) -> float:
    """Device-to-device copy: (bytes read + bytes written) / time, in GB/s."""
    src = torch.empty(nbytes, dtype=torch.int8, device=device).fill_(1)
    dst = torch.empty_like(src)
    return 2 * nbytes / (time_ms(lambda: dst.copy_(src)) * 1e-3) / 1e9


def _passes(fn: Callable, case: dict) -> dict[str, Callable[[], object]]:
    """fwd, bwd (on a retained graph) and fwd+bwd closures of one implementation."""
    args, wrt = case["args"], case["wrt"]
    y = fn(*args)
    dy = torch.randn_like(y)
    return {"fwd": lambda: fn(*args),
            "bwd": lambda: torch.autograd.grad(y, wrt, dy, retain_graph=True),
            "fwd+bwd": lambda: torch.autograd.grad(fn(*args), wrt, dy)}


def run(smoke: bool, reps: int, warmup: int, use_compile: bool, device: str) -> dict:
    shape = SMOKE if smoke else FULL
    dtype = torch.bfloat16
    time_ms = _timer(device, reps, warmup)
    copy_gbs = copy_bandwidth_gbs(device, (16 << 20) if smoke else (1 << 30), time_ms)
    results = []
    for case in _cases(shape, dtype, device):
        kernel, reference = case["fns"]
        impls = {"triton": kernel, "eager": reference}
        if use_compile:
            impls["compile"] = torch.compile(reference)
        rows = []
        for impl, fn in impls.items():
            for pass_name, call in _passes(fn, case).items():
                ms = time_ms(call)
                nbytes = {"fwd": case["fwd_bytes"], "bwd": case["bwd_bytes"]}.get(
                    pass_name, case["fwd_bytes"] + case["bwd_bytes"])
                gbs = nbytes / (ms * 1e-3) / 1e9
                rows.append({"op": case["op"], "shape": case["shape"], "impl": impl, "pass": pass_name, "ms": ms,
                             "bytes": nbytes, "gbs": gbs, "pct_copy": 100 * gbs / copy_gbs})
        eager_ms = {r["pass"]: r["ms"] for r in rows if r["impl"] == "eager"}
        for r in rows:
            r["speedup_vs_eager"] = eager_ms[r["pass"]] / r["ms"]
        results += rows
    return dict(
        device=torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine()),
        device_type=device, date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
        git_commit=source_commit(), interpreter=os.environ.get("TRITON_INTERPRET") == "1", smoke=smoke,
        dtype=str(dtype).removeprefix("torch."), shapes=shape, reps=reps, warmup=warmup,
        timer="cuda-events, L2 flushed, median" if device == "cuda" else "wall-clock, median",
        copy_gbs=copy_gbs, results=results)


def format_table(report: dict) -> str:
    lines = [f"{report['device']} | torch {report['torch']} | triton {report['triton']} | "
             f"copy {report['copy_gbs']:.0f} GB/s | {report['timer']}",
             f"{'op':<12} {'shape':<16} {'impl':<8} {'pass':<8} {'time':>10} {'GB/s':>8} {'% copy':>7} {'vs eager':>9}"]
    for r in report["results"]:
        t = f"{r['ms'] * 1e3:.1f} us" if r["ms"] < 1 else f"{r['ms']:.3f} ms"
        lines.append(f"{r['op']:<12} {r['shape']:<16} {r['impl']:<8} {r['pass']:<8} {t:>10} {r['gbs']:>8.1f} "
                     f"{r['pct_copy']:>6.1f}% {r['speedup_vs_eager']:>8.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llama_erc.benchmarks.kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="write the JSON report here (default on CUDA: "
                   "benchmarks/results/kernels-<device>-<date>.json; on CPU: none)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (always on without CUDA)")
    p.add_argument("--reps", type=int, default=None, help="timed runs per measurement (default 100, smoke 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 10, smoke 1)")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="also time torch.compile of the reference (auto: on CUDA only; slow to build on CPU)")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print("no CUDA device: run with TRITON_INTERPRET=1 (set before `kernels` is imported) for the CPU smoke run")
        return 2
    smoke = args.smoke or device == "cpu"
    reps = args.reps or (3 if smoke else 100)
    warmup = args.warmup if args.warmup is not None else (1 if smoke else 10)
    use_compile = args.compile == "on" or (args.compile == "auto" and device == "cuda")
    report = run(smoke, reps, warmup, use_compile, device)
    print(format_table(report))
    out = args.out
    if out is None and device == "cuda" and not smoke:
        slug = "".join(c if c.isalnum() else "-" for c in report["device"]).strip("-").lower()
        out = Path("benchmarks/results") / f"kernels-{slug}-{report['date'][:10]}.json"
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
