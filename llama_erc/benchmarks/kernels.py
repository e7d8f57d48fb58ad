"""Kernel benchmark: Triton vs eager PyTorch (the reference ops) vs torch.compile of the reference.

    python -m llama_erc.benchmarks.kernels [--out results.json] [--reps 100] [--repeats 3] [--compile auto|on|off]
                                           [--smoke]

Times forward, backward and forward+backward of each op at LLaMA-2-7B training shapes (8 x 512 tokens, hidden
4096, FFN 11008, 32 heads x 128) in bf16, with inputs that require grad as in training. The RMSNorm weight is
frozen as under LoRA ("rms_norm"); "rms_norm+dw" also trains it. "add_rms_norm" is the block's residual add and
ffn_norm, (x, residual) -> (h, y) with the weight frozen; its backward takes gradients for both outputs (the
residual stream's dh and the norm's dy), and eager's is autograd's (the norm's backward, then the add of dh).
"rope_qk" rotates q and k (32 + 32 heads) in one launch each way, into fresh tensors; "rope_qk_" is its in-place
forward (direct calls without a graph; its backward is rope_qk's launch), "swiglu_bwd_" the flat backward that
writes dgate and dup over gate and up (pass "bwd", direct calls; beside it "rows", swiglu's row kernel into
fresh tensors, and eager, autograd's backward of F.silu(g) * u). In-place rows have no torch.compile row.
Launch configs (num_warps, rows per program) are swept by benchmarks/kernel_sweep.py, not here.
"dequant <type>" rows time the weight-dequantization kernels (GGUF Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K and NF4)
forward only, as the packed weight is frozen: no backward or fwd+bwd rows, in the table or the JSON (whose "ops"
lists each op's passes). They unpack one LLaMA-2-7B FFN weight (11008 x 4096; smoke: 64 x 256, whole K-quant
blocks) into bf16: GGUF from random blocks with small finite f16 scales, NF4 quantized from a random weight by
reference_nf4.quantize_nf4. Before timing, each implementation's output is checked against the eager twin's
(the Triton kernel bit for bit, torch.compile to within one bf16 ulp); a mismatch stops the benchmark.

What is timed, and how. Each (op, impl, pass) row is measured --repeats times (default 3); each repeat runs
--reps calls (default 100) and the row reports the median with the min and max over the repeats (the spread):
- device_us: the device time of one call. On CUDA, torch.profiler (CUPTI) records the N calls and device_us is
  the sum of the durations of the device events (kernels, memsets, memcpys) divided by N; kernels_per_call is
  their count / N. Host-side work (Python, autograd, Triton's launcher checks) is not in it, and gaps between
  kernels are not counted. On CPU there is no device timeline: device_us is the profiler's self CPU time of the
  recorded ops (the whole call, Python included) / N, kernels_per_call the top-level ops per call, and the JSON
  says timer "cpu-profiler". Under TRITON_INTERPRET=1 the Triton rows run in the interpreter: the CPU rows only
  exercise the code path and are meaningless as speed.
- host_us: wall time of the Python call, N calls in a loop without a synchronization inside it (on CUDA one
  synchronize before and one after, outside the timed loop), divided by N; it is its own column, not mixed into
  device_us. If the device is slower than the host the launch queue can fill, so host_us is an upper bound
  on the host cost only for ops whose device_us is below it.
- Inputs rotate over K pre-made buffer sets (each input cloned K times; for bwd, K retained graphs) so that a
  call does not find its inputs in L2: on CUDA K is the smallest count of sets whose bytes exceed an assumed
  64 MB L2 (at least 2), on CPU K = 2. This replaces the zeroing flush between calls.
- The ceiling: a device-to-device copy moving the row's bytes (half read, half written), rotated the same way
  and timed by the same timer; copy_us is its device_us and "% copy" = copy_us / device_us (100% = as fast as
  a copy of the same size). GB/s is bytes / device_us.
- The trained ops' rows all go through autograd, labelled through_autograd: the fwd row calls the op with
  inputs that require grad (the autograd.Function saves what backward needs), bwd is torch.autograd.grad on a
  retained graph, fwd+bwd is the forward then torch.autograd.grad; the dequant rows are direct calls.
GB/s counts the bytes the op must move, each input read once and each output written once (saved
intermediates such as rstd are not counted), for every implementation alike; for dequant, the quantized
weight's bytes read (NF4: packed codes, absmax codes, nested absmax and the 256-entry nested map) plus the bf16
output written. The report's copy_gbs is the bandwidth of a 256 MiB copy (smoke: 16 MiB) under the same timer.
On CPU it runs a tiny smoke size (under the interpreter when TRITON_INTERPRET=1), without torch.compile by default.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import importlib
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
import triton
from torch import Tensor
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from llama_erc.benchmarks.provenance import source_commit
from llama_erc.kernels import (REFERENCE, add_rms_norm, apply_rope, apply_rope_qk, apply_rope_qk_, rms_norm,
                               swiglu)
from llama_erc.kernels.dequant_gguf import dequant_gguf
from llama_erc.kernels.dequant_nf4 import dequant_nf4
from llama_erc.kernels.reference_gguf import GGUF_BLOCKS, dequantize_gguf
from llama_erc.kernels.reference_nf4 import NF4Weight, dequantize_nf4, quantize_nf4

FULL = dict(tokens=(8, 512), dim=4096, ffn=11008, heads=32, head_dim=128, dequant=(11008, 4096))
SMOKE = dict(tokens=(2, 8), dim=64, ffn=176, heads=4, head_dim=16, dequant=(64, 256))
# the GGUF types benchmarked, each with the byte offsets of its blocks' f16 fields (d; then m or dmin)
GGUF_F16_FIELDS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
L2_BYTES = 64 << 20  # assumed L2 size (H100: 50 MB, H200: 60 MB): the rotating input sets together exceed it
MAX_SETS = 64  # at most this many rotating buffer sets (tiny ops)
swiglu_module = importlib.import_module("llama_erc.kernels.swiglu")  # `kernels.swiglu` is the function
CALL_RANGE = "bench::call"  # the profiler range around each call on CPU


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


def _eager_swiglu_bwd(dy: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    """(dgate, dup) of F.silu(gate) * up as eager autograd computes them, in the input dtype."""
    return torch.ops.aten.silu_backward(dy * up, gate), dy * F.silu(gate)


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
    q, k = rnd(B, T, H, Dh), rnd(B, T, H, Dh)  # 7B: as many kv heads as q heads
    qk_bytes = 2 * 2 * M * H * Dh * e + 2 * T * Dh // 2 * 4  # q, k read and written; cos, sin read
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
        dict(op="rope_qk", shape=f"{B}x{T}x{H}+{H}x{Dh}", args=(q, k, cos, sin), wrt=(q, k),
             fns=(apply_rope_qk, REFERENCE.apply_rope_qk), fwd_bytes=qk_bytes, bwd_bytes=qk_bytes),
        # in place, so direct calls without a graph (its backward is rope_qk's launch); each call rotates the
        # same buffers again, which costs the kernel nothing; no torch.compile row (compiling an in-place twin
        # that checks for dispatch modes is neither built nor checked here)
        dict(op="rope_qk_", shape=f"{B}x{T}x{H}+{H}x{Dh}", args=(rnd(B, T, H, Dh, grad=False),
             rnd(B, T, H, Dh, grad=False), cos, sin), wrt=(), fns=(apply_rope_qk_, REFERENCE.apply_rope_qk_),
             fwd_bytes=qk_bytes, bwd_bytes=None, compile=False),
        # swiglu_'s backward: the flat kernel writing dgate, dup over gate, up (direct calls: the values drift
        # call after call, which costs nothing); "rows" is swiglu's row kernel into fresh tensors, and eager is
        # autograd's backward of F.silu(g) * u (silu_backward, and silu(g) recomputed here rather than saved)
        dict(op="swiglu_bwd_", shape=f"{M}x{Fd}", args=(rnd(M, Fd, grad=False), rnd(M, Fd, grad=False),
             rnd(M, Fd, grad=False)), wrt=(), fns=(swiglu_module.swiglu_bwd_, _eager_swiglu_bwd),
             extra_impls={"rows": swiglu_module.swiglu_bwd}, fwd_bytes=5 * M * Fd * e, bwd_bytes=None,
             pass_name="bwd", compile=False),
    ] + _dequant_cases(shape["dequant"], dtype, device, g)


def rotation_count(set_bytes: int, device: str, l2_bytes: int = L2_BYTES) -> int:
    """How many buffer sets of set_bytes each to rotate over: on CUDA the fewest (at least 2, at most MAX_SETS)
    whose bytes together exceed l2_bytes, so each call reads its inputs from HBM; on CPU 2."""
    if device != "cuda":
        return 2
    return min(MAX_SETS, max(2, l2_bytes // max(1, set_bytes) + 1))


def clone_args(args: tuple) -> tuple:
    """A fresh copy of an argument tuple: tensors cloned (keeping requires_grad), NF4Weight's tensors cloned,
    everything else (dtypes, shapes, names, floats) shared."""
    def one(a):
        if isinstance(a, Tensor):
            return a.detach().clone().requires_grad_(a.requires_grad)
        if isinstance(a, NF4Weight):
            return dataclasses.replace(a, **{f.name: one(getattr(a, f.name)) for f in dataclasses.fields(a)
                                             if isinstance(getattr(a, f.name), Tensor)})
        return a
    return tuple(one(a) for a in args)


def _spread(values: list[float]) -> dict:
    return dict(median=statistics.median(values), min=min(values), max=max(values))


class KernelTimer:
    """measure(call) times call(i), i = 0, 1, ..., which uses buffer set i % K: the median, min and max over
    `repeats` repeats of device time per call (torch.profiler; on CPU the profiler's self CPU time) and of host
    wall time per call, each repeat `calls` calls; see the module docstring."""

    def __init__(self, device: str, calls: int, warmup: int, repeats: int):
        self.device, self.calls, self.warmup, self.repeats = device, calls, warmup, repeats
        self.cuda = device == "cuda"
        self.name = "torch.profiler device (CUPTI) kernel time" if self.cuda else "cpu-profiler"

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def profile_once(self, call: Callable[[int], object]) -> tuple[float, float]:
        """(device us per call, device events per call) over self.calls calls."""
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        self._sync()
        with profile(activities=activities) as prof:
            for i in range(self.calls):
                if self.cuda:
                    call(i)
                else:
                    with record_function(CALL_RANGE):
                        call(i)
            self._sync()
        events = prof.events()
        if self.cuda:
            dev = [e for e in events if e.device_type == DeviceType.CUDA]
            if not dev:
                raise RuntimeError("torch.profiler recorded no CUDA device events; cannot time kernels")
            total, count = sum(e.time_range.elapsed_us() for e in dev), len(dev)
        else:
            total = sum(e.self_cpu_time_total for e in events)
            count = sum(1 for e in events if e.cpu_parent is not None and e.cpu_parent.name == CALL_RANGE)
        return total / self.calls, count / self.calls

    def host_once(self, call: Callable[[int], object]) -> float:
        """Wall microseconds per call over self.calls calls, no synchronization inside the loop."""
        self._sync()
        t0 = time.perf_counter()
        for i in range(self.calls):
            call(i)
        t1 = time.perf_counter()
        self._sync()
        return (t1 - t0) * 1e6 / self.calls

    def measure(self, call: Callable[[int], object]) -> dict:
        for i in range(self.warmup):
            call(i)
        dev, kern, host = [], [], []
        for _ in range(self.repeats):
            d, k = self.profile_once(call)
            dev.append(d)
            kern.append(k)
            host.append(self.host_once(call))
        d, h = _spread(dev), _spread(host)
        return dict(device_us=d["median"], device_us_min=d["min"], device_us_max=d["max"], device_us_runs=dev,
                    host_us=h["median"], host_us_min=h["min"], host_us_max=h["max"], host_us_runs=host,
                    kernels_per_call=statistics.median(kern), repeats=self.repeats, calls=self.calls)


def copy_ceiling(nbytes: int, device: str, timer: KernelTimer) -> dict:
    """The ceiling for an op moving nbytes: a device-to-device copy of nbytes // 2 bytes (so nbytes read +
    written), rotating over buffer pairs like the op's inputs, timed by `timer`. Returns its measure() dict
    plus bytes, rotating_buffers and gbs (from device time)."""
    n = max(1, nbytes // 2)
    k = rotation_count(2 * n, device)
    src = [torch.full((n,), 1, dtype=torch.int8, device=device) for _ in range(k)]
    dst = [torch.empty_like(s) for s in src]
    m = timer.measure(lambda i: dst[i % k].copy_(src[i % k]))
    return dict(m, bytes=2 * n, rotating_buffers=k, gbs=2 * n / (m["device_us"] * 1e-6) / 1e9)


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


def _passes(fn: Callable, case: dict, sets: list[tuple] | None = None) -> dict[str, Callable[[int], object]]:
    """fwd, bwd (on a retained graph) and fwd+bwd closures of one implementation, each taking a call index i and
    using input set i % len(sets) (default: the case's own args only); fwd alone for a forward-only case
    (bwd_bytes None). An op with several outputs (a tuple) gets a gradient for each."""
    sets = sets or [case["args"]]
    k = len(sets)
    if case["bwd_bytes"] is None:  # a direct call: a frozen weight's forward, or an in-place kernel
        return {case.get("pass_name", "fwd"): lambda i: fn(*sets[i % k])}
    pos = [next(j for j, a in enumerate(case["args"]) if a is t) for t in case["wrt"]]
    wrts = [tuple(s[j] for j in pos) for s in sets]
    ys = [fn(*s) for s in sets]
    dys = [tuple(torch.randn_like(t) for t in y) if isinstance(y, tuple) else torch.randn_like(y) for y in ys]
    return {"fwd": lambda i: fn(*sets[i % k]),
            "bwd": lambda i: torch.autograd.grad(ys[i % k], wrts[i % k], dys[i % k], retain_graph=True),
            "fwd+bwd": lambda i: torch.autograd.grad(fn(*sets[i % k]), wrts[i % k], dys[i % k])}


VIA = {"fwd": "forward, inputs require grad (autograd.Function records the graph)",
       "bwd": "torch.autograd.grad on a retained graph", "fwd+bwd": "forward, then torch.autograd.grad"}


def _pass_bytes(case: dict, pass_name: str) -> int:
    if pass_name == "fwd" or case["bwd_bytes"] is None:  # a direct call moves fwd_bytes whatever its pass
        return case["fwd_bytes"]
    return case["bwd_bytes"] + (case["fwd_bytes"] if pass_name == "fwd+bwd" else 0)


def run(smoke: bool, reps: int, warmup: int, use_compile: bool, device: str, repeats: int = 3) -> dict:
    shape = SMOKE if smoke else FULL
    dtype = torch.bfloat16
    timer = KernelTimer(device, reps, warmup, repeats)
    big = copy_ceiling((32 << 20) if smoke else (512 << 20), device, timer)  # a 16 / 256 MiB copy
    ceilings: dict[int, dict] = {}  # bytes -> the same-size copy, measured once per size
    results, ops = [], {}
    for case in _cases(shape, dtype, device):
        kernel, reference = case["fns"]
        impls = {"triton": kernel, "eager": reference, **case.get("extra_impls", {})}
        if use_compile and case.get("compile", True):
            impls["compile"] = torch.compile(reference)
        if case.get("check"):
            check_outputs(case, impls)
        k = rotation_count(case["fwd_bytes"] + (case["bwd_bytes"] or 0), device)
        sets = [case["args"]] + [clone_args(case["args"]) for _ in range(k - 1)]
        trained = case["bwd_bytes"] is not None
        rows = []
        for impl, fn in impls.items():
            for pass_name, call in _passes(fn, case, sets).items():
                m = timer.measure(call)
                nbytes = _pass_bytes(case, pass_name)
                if nbytes not in ceilings:
                    ceilings[nbytes] = copy_ceiling(nbytes, device, timer)
                copy_us = ceilings[nbytes]["device_us"]
                rows.append({"op": case["op"], "shape": case["shape"], "impl": impl, "pass": pass_name,
                             "through_autograd": trained, "via": VIA[pass_name] if trained else "direct call",
                             **m, "ms": m["device_us"] * 1e-3, "rotating_buffers": k, "bytes": nbytes,
                             "gbs": nbytes / (m["device_us"] * 1e-6) / 1e9, "copy_us": copy_us,
                             "copy_rotating_buffers": ceilings[nbytes]["rotating_buffers"],
                             "pct_copy": 100 * copy_us / m["device_us"]})
        eager_us = {r["pass"]: r["device_us"] for r in rows if r["impl"] == "eager"}
        for r in rows:
            r["speedup_vs_eager"] = eager_us[r["pass"]] / r["device_us"]
        results += rows
        ops[case["op"]] = dict(shape=case["shape"], passes=list(dict.fromkeys(r["pass"] for r in rows)),
                               checked_vs_eager=bool(case.get("check")))
    return dict(
        device=torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine()),
        device_type=device, date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
        git_commit=source_commit(), interpreter=os.environ.get("TRITON_INTERPRET") == "1", smoke=smoke,
        dtype=str(dtype).removeprefix("torch."), shapes=shape, reps=reps, calls=reps, repeats=repeats,
        warmup=warmup, timer=timer.name, l2_bytes_assumed=L2_BYTES if device == "cuda" else None,
        rotation="inputs rotate over K buffer sets exceeding the assumed L2 (CPU: K = 2); no flush",
        copy_gbs=big["gbs"], copy_bytes=big["bytes"], ops=ops, results=results)


def _us(v: float) -> str:
    return f"{v:.1f}" if v < 1e3 else f"{v:.0f}"


def format_table(report: dict) -> str:
    lines = [f"{report['device']} | torch {report['torch']} | triton {report['triton']} | timer {report['timer']} | "
             f"{report.get('repeats', 1)} repeats x {report.get('calls', report.get('reps'))} calls, median "
             f"[min-max] | copy {report['copy_gbs']:.0f} GB/s",
             f"{'op':<12} {'shape':<16} {'impl':<8} {'pass':<8} {'dev us':>9} {'dev spread':>17} {'host us':>9} "
             f"{'host spread':>17} {'kern':>5} {'GB/s':>8} {'% copy':>7} {'vs eager':>9} {'K':>3} autograd"]
    for r in report["results"]:
        dev_sp = f"[{_us(r['device_us_min'])}-{_us(r['device_us_max'])}]"
        host_sp = f"[{_us(r['host_us_min'])}-{_us(r['host_us_max'])}]"
        lines.append(f"{r['op']:<12} {r['shape']:<16} {r['impl']:<8} {r['pass']:<8} {_us(r['device_us']):>9} "
                     f"{dev_sp:>17} {_us(r['host_us']):>9} {host_sp:>17} {r['kernels_per_call']:>5.1f} "
                     f"{r['gbs']:>8.1f} {r['pct_copy']:>6.1f}% {r['speedup_vs_eager']:>8.2f}x "
                     f"{r['rotating_buffers']:>3} {'yes' if r['through_autograd'] else 'no'}")
    lines.append("dev us: device time per call (CPU: profiler self CPU time, not speed under the interpreter); host "
                 "us: Python call wall time; kern: device events (CPU: top-level ops) per call; % copy: a same-size "
                 "copy's device time / the op's; K: rotating input sets")
    fwd_only = [op for op, o in report.get("ops", {}).items() if o["passes"] == ["fwd"]]
    if fwd_only:
        lines.append(f"forward only, no bwd / fwd+bwd rows (frozen weight, or in place): {', '.join(fwd_only)}")
    return "\n".join(lines)


def bench_device(smoke: bool, cpu_run: str) -> tuple[str, bool] | None:
    """The device a kernel benchmark runs on and whether it uses the tiny shapes (always, without CUDA); None,
    after saying why, on a CPU without the Triton interpreter, where the kernels cannot run."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print(f"no CUDA device: run with TRITON_INTERPRET=1 (set before `kernels` is imported) for the CPU {cpu_run}")
        return None
    return device, smoke or device == "cpu"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llama_erc.benchmarks.kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="write the JSON report here (default on CUDA: "
                   "benchmarks/results/kernels-<device>-<date>.json; on CPU: none)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (always on without CUDA)")
    p.add_argument("--reps", type=int, default=None, help="calls per repeat (default 100, smoke 3)")
    p.add_argument("--repeats", type=int, default=3, help="repeats of each measurement, for the spread (default 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 10, smoke 1)")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="also time torch.compile of the reference (auto: on CUDA only; slow to build on CPU)")
    args = p.parse_args(argv)
    found = bench_device(args.smoke, "smoke run")
    if found is None:
        return 2
    device, smoke = found
    reps = args.reps or (3 if smoke else 100)
    warmup = args.warmup if args.warmup is not None else (1 if smoke else 10)
    use_compile = args.compile == "on" or (args.compile == "auto" and device == "cuda")
    report = run(smoke, reps, warmup, use_compile, device, repeats=max(1, args.repeats))
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
