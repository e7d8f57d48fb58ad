"""Kernel benchmark: Triton vs eager PyTorch (the reference ops) vs torch.compile of the reference.

    python -m llama_erc.benchmarks.kernels [--out results.json] [--reps 100] [--compile auto|on|off] [--smoke]

Times forward, backward and forward+backward of each op at LLaMA-2-7B training shapes (8 x 512 tokens, hidden
4096, FFN 11008, 32 heads x 128) in bf16, with inputs that require grad as in training. The RMSNorm weight is
frozen as under LoRA ("rms_norm"); "rms_norm+dw" also trains it. "add_rms_norm" is the block's residual add and
ffn_norm, (x, residual) -> (h, y) with the weight frozen; its backward takes gradients for both outputs (the
residual stream's dh and the norm's dy), and eager's is autograd's (the norm's backward, then the add of dh).
"dequant <type>" rows time the weight-dequantization kernels (GGUF Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K and NF4)
forward only, as the packed weight is frozen: no backward or fwd+bwd rows, in the table or the JSON (whose "ops"
lists each op's passes). They unpack one LLaMA-2-7B FFN weight (11008 x 4096; smoke: 64 x 256, whole K-quant
blocks) into bf16: GGUF from random blocks with small finite f16 scales, NF4 quantized from a random weight by
reference_nf4.quantize_nf4. Before timing, each implementation's output is checked against the eager twin's
(the Triton kernel bit for bit, torch.compile to within one bf16 ulp); a mismatch stops the benchmark.
Timing: on CUDA, CUDA events around each call, the L2 cache flushed before each (a 256 MB write), the median
of --reps runs; backward alone is torch.autograd.grad on a retained graph. On CPU it runs a tiny smoke size
with wall-clock timing (under the interpreter when TRITON_INTERPRET=1), without torch.compile by default.
GB/s counts the bytes the op must move, each input read once and each output written once (saved
intermediates such as rstd are not counted), for every implementation alike; for dequant, the quantized
weight's bytes read (NF4: packed codes, absmax codes, nested absmax and the 256-entry nested map) plus the bf16
output written. "% copy" divides by the device-to-device copy bandwidth measured here (bytes read + written by
a large tensor copy).
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
from torch import Tensor

from llama_erc.benchmarks.provenance import source_commit
from llama_erc.kernels import REFERENCE, add_rms_norm, apply_rope, rms_norm, swiglu
from llama_erc.kernels.dequant_gguf import dequant_gguf
from llama_erc.kernels.dequant_nf4 import dequant_nf4
from llama_erc.kernels.reference_gguf import GGUF_BLOCKS, dequantize_gguf
from llama_erc.kernels.reference_nf4 import NF4Weight, dequantize_nf4, quantize_nf4

FULL = dict(tokens=(8, 512), dim=4096, ffn=11008, heads=32, head_dim=128, dequant=(11008, 4096))
SMOKE = dict(tokens=(2, 8), dim=64, ffn=176, heads=4, head_dim=16, dequant=(64, 256))
# the GGUF types benchmarked, each with the byte offsets of its blocks' f16 fields (d; then m or dmin)
GGUF_F16_FIELDS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
FLUSH_BYTES = 256 << 20  # larger than any GPU's L2 (50 MB on H100), so every run reads from HBM


def random_gguf_blocks(ggml_type: str, n_blocks: int, g: torch.Generator) -> Tensor:
    """(n_blocks * bytes,) uint8 raw blocks of ggml_type on the CPU: random quant bytes (and 6-bit / int8
    sub-scales), every f16 field a finite value of magnitude 2**-12 to 2**-9 with a random sign."""
    blocks = torch.randint(0, 256, (n_blocks, GGUF_BLOCKS[ggml_type][1]), generator=g, dtype=torch.uint8)
    for offset in GGUF_F16_FIELDS[ggml_type]:
        sign = torch.randint(0, 2, (n_blocks,), generator=g) * 2 - 1
        scale = sign * torch.exp2(-9 - 3 * torch.rand(n_blocks, generator=g))  # (n_blocks,) fp32
        blocks[:, offset:offset + 2] = scale.to(torch.float16).view(torch.uint8).view(n_blocks, 2)
    return blocks.view(-1)


def nf4_bytes(q: NF4Weight) -> int:
    """Bytes of an NF4Weight's tensors, all of which the dequantization reads."""
    return sum(t.numel() * t.element_size() for t in (q.packed, q.absmax_codes, q.nested_absmax, q.nested_code))


def _dequant_cases(shape: tuple[int, int], dtype: torch.dtype, device: str, g: torch.Generator) -> list[dict]:
    """One forward-only case per quantized format: unpack a (rows, cols) weight into dtype. Bytes: the quantized
    weight read + the output written."""
    n, e, name = shape[0] * shape[1], torch.tensor([], dtype=dtype).element_size(), f"{shape[0]}x{shape[1]}"
    cases = []
    for ggml_type in GGUF_F16_FIELDS:
        data = random_gguf_blocks(ggml_type, n // GGUF_BLOCKS[ggml_type][0], g).to(device)
        cases.append(dict(op=f"dequant {ggml_type}", shape=name, args=(data, ggml_type, shape, dtype), wrt=(),
                          fns=(dequant_gguf, dequantize_gguf), fwd_bytes=data.numel() + n * e, bwd_bytes=None,
                          check=True))
    q = quantize_nf4(torch.randn(*shape, generator=g).to(device) * 0.02)  # LLaMA-like weight scale
    cases.append(dict(op="dequant NF4", shape=name, args=(q, dtype), wrt=(), fns=(dequant_nf4, dequantize_nf4),
                      fwd_bytes=nf4_bytes(q) + n * e, bwd_bytes=None, check=True))
    return cases


def _cases(shape: dict, dtype: torch.dtype, device: str) -> list[dict]:
    """One dict per op: its inputs, the tensors it differentiates, and the bytes each pass must move
    (bwd_bytes None: forward only, the dequant cases, which also have their outputs checked)."""
    B, T = shape["tokens"]
    D, Fd, H, Dh = shape["dim"], shape["ffn"], shape["heads"], shape["head_dim"]
    M, e = B * T, torch.tensor([], dtype=dtype).element_size()
    g = torch.Generator().manual_seed(0)

    def rnd(*s, grad=True, dt=dtype):
        return torch.randn(*s, generator=g).to(device=device, dtype=dt).requires_grad_(grad)

    cos, sin = REFERENCE.rope_cos_sin(torch.arange(T, device=device), Dh)  # (T, Dh/2) fp32
    x, w_frozen, w = rnd(M, D), rnd(D, grad=False), rnd(D)
    res = rnd(M, D)  # the residual stream, added to x
    gate, up = rnd(M, Fd), rnd(M, Fd)
    q = rnd(B, T, H, Dh)
    return [
        dict(op="rms_norm", shape=f"{M}x{D}", args=(x, w_frozen, 1e-5), wrt=(x,), fns=(rms_norm, REFERENCE.rms_norm),
             fwd_bytes=2 * M * D * e + D * e, bwd_bytes=3 * M * D * e + D * e),  # x, w -> y; dy, x, w -> dx
        dict(op="rms_norm+dw", shape=f"{M}x{D}", args=(x, w, 1e-5), wrt=(x, w), fns=(rms_norm, REFERENCE.rms_norm),
             fwd_bytes=2 * M * D * e + D * e, bwd_bytes=3 * M * D * e + 2 * D * e),  # ... -> dx, dw
        dict(op="add_rms_norm", shape=f"{M}x{D}", args=(x, res, w_frozen, 1e-5), wrt=(x, res),
             fns=(add_rms_norm, REFERENCE.add_rms_norm),  # x, r, w -> h, y; dh, dy, h, w -> dx (= dr, one tensor)
             fwd_bytes=4 * M * D * e + D * e, bwd_bytes=4 * M * D * e + D * e),
        dict(op="swiglu", shape=f"{M}x{Fd}", args=(gate, up), wrt=(gate, up), fns=(swiglu, REFERENCE.swiglu),
             fwd_bytes=3 * M * Fd * e, bwd_bytes=5 * M * Fd * e),  # g, u -> y; dy, g, u -> dg, du
        dict(op="rope", shape=f"{B}x{T}x{H}x{Dh}", args=(q, cos, sin), wrt=(q,), fns=(apply_rope, REFERENCE.apply_rope),
             fwd_bytes=2 * M * H * Dh * e + 2 * T * Dh // 2 * 4, bwd_bytes=2 * M * H * Dh * e + 2 * T * Dh // 2 * 4),
    ] + _dequant_cases(shape["dequant"], dtype, device, g)


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


def check_outputs(case: dict, impls: dict[str, Callable]) -> None:
    """Raise RuntimeError unless every implementation's output equals the eager twin's: the Triton kernel's bit
    for bit (it rounds the spec's fp32 values once), torch.compile's to within one ulp of the output dtype
    (inductor may fuse a product and a sum into an FMA)."""
    want = impls["eager"](*case["args"])
    for impl, fn in impls.items():
        got = fn(*case["args"])
        if impl == "eager":
            continue
        if got.dtype != want.dtype or got.shape != want.shape:
            raise RuntimeError(f"{case['op']}: {impl} gives {got.dtype} {tuple(got.shape)}, eager "
                               f"{want.dtype} {tuple(want.shape)}")
        if impl == "triton":
            int_type = {4: torch.int32, 2: torch.int16}[got.element_size()]
            bad = int((got.view(int_type) != want.view(int_type)).sum())
        else:
            bad = int((~torch.isclose(got.float(), want.float(), rtol=torch.finfo(got.dtype).eps, atol=0)).sum())
        if bad:
            raise RuntimeError(f"{case['op']} {case['shape']}: {impl} differs from eager in {bad} of "
                               f"{got.numel()} values; not timing a wrong implementation")


def _passes(fn: Callable, case: dict) -> dict[str, Callable[[], object]]:
    """fwd, bwd (on a retained graph) and fwd+bwd closures of one implementation; fwd alone for a forward-only
    case (bwd_bytes None). An op with several outputs (a tuple) gets a gradient for each."""
    args, wrt = case["args"], case["wrt"]
    if case["bwd_bytes"] is None:
        return {"fwd": lambda: fn(*args)}
    y = fn(*args)
    dy = tuple(torch.randn_like(t) for t in y) if isinstance(y, tuple) else torch.randn_like(y)
    return {"fwd": lambda: fn(*args),
            "bwd": lambda: torch.autograd.grad(y, wrt, dy, retain_graph=True),
            "fwd+bwd": lambda: torch.autograd.grad(fn(*args), wrt, dy)}


def _pass_bytes(case: dict, pass_name: str) -> int:
    if pass_name == "fwd":
        return case["fwd_bytes"]
    return case["bwd_bytes"] + (case["fwd_bytes"] if pass_name == "fwd+bwd" else 0)


def run(smoke: bool, reps: int, warmup: int, use_compile: bool, device: str) -> dict:
    shape = SMOKE if smoke else FULL
    dtype = torch.bfloat16
    time_ms = _timer(device, reps, warmup)
    copy_gbs = copy_bandwidth_gbs(device, (16 << 20) if smoke else (1 << 30), time_ms)
    results, ops = [], {}
    for case in _cases(shape, dtype, device):
        kernel, reference = case["fns"]
        impls = {"triton": kernel, "eager": reference}
        if use_compile:
            impls["compile"] = torch.compile(reference)
        if case.get("check"):
            check_outputs(case, impls)
        rows = []
        for impl, fn in impls.items():
            for pass_name, call in _passes(fn, case).items():
                ms = time_ms(call)
                nbytes = _pass_bytes(case, pass_name)
                gbs = nbytes / (ms * 1e-3) / 1e9
                rows.append({"op": case["op"], "shape": case["shape"], "impl": impl, "pass": pass_name, "ms": ms,
                             "bytes": nbytes, "gbs": gbs, "pct_copy": 100 * gbs / copy_gbs})
        eager_ms = {r["pass"]: r["ms"] for r in rows if r["impl"] == "eager"}
        for r in rows:
            r["speedup_vs_eager"] = eager_ms[r["pass"]] / r["ms"]
        results += rows
        ops[case["op"]] = dict(shape=case["shape"], passes=list(dict.fromkeys(r["pass"] for r in rows)),
                               checked_vs_eager=bool(case.get("check")))
    return dict(
        device=torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine()),
        device_type=device, date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
        git_commit=source_commit(), interpreter=os.environ.get("TRITON_INTERPRET") == "1", smoke=smoke,
        dtype=str(dtype).removeprefix("torch."), shapes=shape, reps=reps, warmup=warmup,
        timer="cuda-events, L2 flushed, median" if device == "cuda" else "wall-clock, median",
        copy_gbs=copy_gbs, ops=ops, results=results)


def format_table(report: dict) -> str:
    lines = [f"{report['device']} | torch {report['torch']} | triton {report['triton']} | "
             f"copy {report['copy_gbs']:.0f} GB/s | {report['timer']}",
             f"{'op':<12} {'shape':<16} {'impl':<8} {'pass':<8} {'time':>10} {'GB/s':>8} {'% copy':>7} {'vs eager':>9}"]
    for r in report["results"]:
        t = f"{r['ms'] * 1e3:.1f} us" if r["ms"] < 1 else f"{r['ms']:.3f} ms"
        lines.append(f"{r['op']:<12} {r['shape']:<16} {r['impl']:<8} {r['pass']:<8} {t:>10} {r['gbs']:>8.1f} "
                     f"{r['pct_copy']:>6.1f}% {r['speedup_vs_eager']:>8.2f}x")
    fwd_only = [op for op, o in report.get("ops", {}).items() if o["passes"] == ["fwd"]]
    if fwd_only:
        lines.append(f"forward only, no bwd / fwd+bwd rows (frozen weight): {', '.join(fwd_only)}")
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
