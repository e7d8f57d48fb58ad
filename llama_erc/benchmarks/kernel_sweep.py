"""Launch-config sweep: num_warps and rows (or elements) per program for each elementwise/row kernel, once.

    python -m llama_erc.benchmarks.kernel_sweep --out PATH.json [--smoke] [--reps 50] [--repeats 3]
                                                [--only "rope_qk" ...]

For each kernel launch below, at LLaMA-2-7B training shapes in bf16 (8 x 512 tokens, hidden 4096, FFN 11008,
32 q heads and 32 or 8 kv heads x 128; --smoke or no CUDA: kernels.SMOKE's tiny shapes), every num_warps in
WARPS and every per-program size in the launch's list is timed with kernels.KernelTimer (torch.profiler device
time per call, the median over --repeats repeats of --reps calls; inputs rotate over buffer sets as in
benchmarks/kernels.py), and the fastest config is written down as that launch's winner beside the default
config's time. Before timing, each config's output is compared with the default config's (a tiling must not
change the result beyond one bf16 ulp, which a different reduction order may cost); a mismatch stops the sweep.

    launch              what "rows" is                       kernel
    rms_norm fwd        BLOCK_M rows of N per program        rms_norm._rms_norm_fwd_kernel
    rms_norm bwd        BLOCK_M rows (dx only: frozen w)      rms_norm._rms_norm_bwd_kernel
    add_rms_norm fwd    BLOCK_M rows                          add_rms_norm._add_rms_norm_fwd_kernel
    add_rms_norm bwd    BLOCK_M rows (dx + dh)                rms_norm._rms_norm_bwd_kernel (HAS_DRES)
    rope_qk fwd/bwd     BLOCK_T positions x all heads         rope._rope_qk_kernel (fwd in place; 32/32 and 32/8)
    swiglu fwd          BLOCK_M rows of 1024 columns          swiglu._swiglu_fwd_kernel
    swiglu bwd          BLOCK elements (flat, in place)       swiglu._swiglu_bwd_flat_kernel

The in-place launches (rope_qk fwd, swiglu bwd) overwrite their inputs on every call: the values drift (and may
overflow to inf or NaN after many calls), which costs the kernels nothing but makes their outputs meaningless;
only the first call, from fresh inputs, is compared. The JSON holds every timed row and the winners; on CPU it is
labelled a dry run (timer "cpu-profiler": under TRITON_INTERPRET=1 the interpreter ignores num_warps and its
times are not the kernels' speed). No number from a CPU run may be read as a GPU result.
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib
import itertools
import json
import os
import platform
from pathlib import Path
from typing import Callable

import torch
import triton

from llama_erc.benchmarks.kernels import FULL, SMOKE, KernelTimer, bench_device, rotation_count
from llama_erc.benchmarks.provenance import source_commit
from llama_erc.kernels import REFERENCE

rms_norm_module = importlib.import_module("llama_erc.kernels.rms_norm")
add_rms_norm_module = importlib.import_module("llama_erc.kernels.add_rms_norm")
rope_module = importlib.import_module("llama_erc.kernels.rope")
swiglu_module = importlib.import_module("llama_erc.kernels.swiglu")

WARPS = (1, 2, 4, 8, 16)
ROWS = (1, 2, 4, 8, 16)  # rows (or positions) per program for the row kernels
FLAT_BLOCKS = (1024, 2048, 4096, 8192, 16384)  # elements per program for the flat SwiGLU backward


def _launches(shape: dict, device: str) -> list[dict]:
    """One dict per launch: name, sizes (what the per-program size is), make(i) -> the input tuple of buffer set
    i, run(inputs, size, num_warps) -> the output tensors, and default (size, num_warps)."""
    B, T = shape["tokens"]
    D, Fd, H, Dh = shape["dim"], shape["ffn"], shape["heads"], shape["head_dim"]
    M, dtype = B * T, torch.bfloat16
    cos, sin = REFERENCE.rope_cos_sin(torch.arange(T, device=device), Dh)  # (T, Dh/2) fp32

    def rnd(seed: int, *s: int) -> torch.Tensor:
        return torch.randn(*s, generator=torch.Generator().manual_seed(seed)).to(device=device, dtype=dtype)

    def rstd(seed: int) -> torch.Tensor:  # (M,) fp32, as the forward saves it
        return (torch.rand(M, generator=torch.Generator().manual_seed(seed)) + 0.5).to(device)

    w = rnd(0, D)
    rms_rows = rms_norm_module.launch_config(M, D)
    launches = [
        dict(name="rms_norm fwd", shape=f"{M}x{D}", sizes=ROWS, default=(rms_rows[0], rms_rows[2]),
             make=lambda i: (rnd(10 + i, M, D),),
             run=lambda a, s, nw: rms_norm_module.rms_norm_fwd(a[0], w, 1e-5, block_m=s, num_warps=nw)),
        dict(name="rms_norm bwd", shape=f"{M}x{D}", sizes=ROWS, default=(rms_rows[0], rms_rows[2]),
             make=lambda i: (rnd(20 + i, M, D), rnd(30 + i, M, D), rstd(35 + i)),
             run=lambda a, s, nw: rms_norm_module.rms_norm_bwd(a[0], a[1], w, a[2], need_dw=False, block_m=s,
                                                               num_warps=nw)[0]),
        dict(name="add_rms_norm fwd", shape=f"{M}x{D}", sizes=ROWS, default=(rms_rows[0], rms_rows[2]),
             make=lambda i: (rnd(40 + i, M, D), rnd(50 + i, M, D)),
             run=lambda a, s, nw: add_rms_norm_module.add_rms_norm_fwd(a[0], a[1], w, 1e-5, block_m=s,
                                                                       num_warps=nw)[:2]),
        dict(name="add_rms_norm bwd", shape=f"{M}x{D}", sizes=ROWS, default=(rms_rows[0], rms_rows[2]),
             make=lambda i: (rnd(60 + i, M, D), rnd(70 + i, M, D), rnd(80 + i, M, D),
                             rstd(85 + i)),
             run=lambda a, s, nw: add_rms_norm_module.add_rms_norm_bwd(a[0], a[1], a[2], w, a[3], need_dw=False,
                                                                       block_m=s, num_warps=nw)[0]),
    ]
    for n_kv in sorted({H, max(1, H // 4)}, reverse=True):  # 7B (MHA) and GQA with a quarter of the heads
        bt, _, _, _, nw = rope_module.qk_launch_config(B, T, H, n_kv, Dh)
        make = (lambda kv: lambda i: (rnd(90 + i, B, T, H, Dh), rnd(100 + i, B, T, kv, Dh)))(n_kv)
        launches += [
            dict(name=f"rope_qk fwd (in place) H={H} Hkv={n_kv}", shape=f"{B}x{T}x{H}+{n_kv}x{Dh}", sizes=ROWS,
                 default=(bt, nw), make=make, in_place=True,
                 run=lambda a, s, nw: rope_module.rope_qk_fwd_(a[0], a[1], cos, sin, block_t=s, num_warps=nw)),
            dict(name=f"rope_qk bwd H={H} Hkv={n_kv}", shape=f"{B}x{T}x{H}+{n_kv}x{Dh}", sizes=ROWS,
                 default=(bt, nw), make=make,
                 run=lambda a, s, nw: rope_module.rope_qk_bwd(a[0], a[1], cos, sin, block_t=s, num_warps=nw)),
        ]
    sw = swiglu_module.launch_config(M, Fd)
    launches += [
        dict(name="swiglu fwd", shape=f"{M}x{Fd}", sizes=ROWS, default=(sw[0], sw[3]),
             make=lambda i: (rnd(110 + i, M, Fd), rnd(120 + i, M, Fd)),
             run=lambda a, s, nw: swiglu_module.swiglu_fwd(a[0], a[1], block_m=s, num_warps=nw)),
        dict(name="swiglu bwd (flat, in place)", shape=f"{M}x{Fd}", sizes=FLAT_BLOCKS,
             default=(swiglu_module.TILE_ELEMS, swiglu_module.num_warps_for(swiglu_module.TILE_ELEMS)),
             make=lambda i: (rnd(130 + i, M, Fd), rnd(140 + i, M, Fd), rnd(150 + i, M, Fd)), in_place=True,
             run=lambda a, s, nw: swiglu_module.swiglu_bwd_(a[0], a[1], a[2], block=s, num_warps=nw)),
    ]
    return launches


def _outputs(out) -> list[torch.Tensor]:
    return [t for t in (out if isinstance(out, (tuple, list)) else (out,)) if t is not None]


def _check_same(launch: dict, size: int, warps: int) -> None:
    """The config's output from fresh inputs against the default config's: within one bf16 ulp (2**-7
    relative; a different reduction tiling may round rstd's sum differently), else RuntimeError."""
    want = [t.float() for t in _outputs(launch["run"](launch["make"](0), *launch["default"]))]
    got = [t.float() for t in _outputs(launch["run"](launch["make"](0), size, warps))]
    for g, e in zip(got, want):
        if not torch.allclose(g, e, rtol=2.0 ** -7, atol=1e-6, equal_nan=True):
            bad = int((~torch.isclose(g, e, rtol=2.0 ** -7, atol=1e-6, equal_nan=True)).sum())
            raise RuntimeError(f"{launch['name']}: size {size}, num_warps {warps} differs from the default "
                               f"config {launch['default']} in {bad} of {g.numel()} values; not timing it")


def sweep(smoke: bool, reps: int, warmup: int, repeats: int, device: str, only: tuple[str, ...] = (),
          log: Callable[[str], None] = print) -> dict:
    """Every launch (only: those whose name starts with one of these) x config, timed -> the report dict."""
    shape = SMOKE if smoke else FULL
    timer = KernelTimer(device, reps, warmup, repeats)
    rows, winners = [], {}
    launches = [x for x in _launches(shape, device) if not only or x["name"].startswith(tuple(only))]
    if not launches:
        raise ValueError(f"--only {list(only)} matches no launch; names: "
                         + ", ".join(x["name"] for x in _launches(shape, device)))
    for launch in launches:
        nbytes = sum(t.numel() * t.element_size() for t in launch["make"](0))
        k = rotation_count(nbytes, device)
        sets = [launch["make"](i) for i in range(k)]
        timed = []
        for size, warps in itertools.product(launch["sizes"], WARPS):
            _check_same(launch, size, warps)
            m = timer.measure(lambda i, s=size, w=warps: launch["run"](sets[i % k], s, w))
            row = dict(launch=launch["name"], shape=launch["shape"], size=size, num_warps=warps,
                       default=(size, warps) == tuple(launch["default"]), rotating_buffers=k, **m)
            timed.append(row)
            log(f"{launch['name']:<36} size {size:>6} warps {warps:>2}  {m['device_us']:>10.1f} us")
        best = min(timed, key=lambda r: r["device_us"])
        default = next((r for r in timed if r["default"]), None)  # None: the default lies outside the grid
        winners[launch["name"]] = dict(shape=launch["shape"], size=best["size"], num_warps=best["num_warps"],
                                       device_us=best["device_us"], default_size=launch["default"][0],
                                       default_num_warps=launch["default"][1],
                                       default_us=default["device_us"] if default else None,
                                       speedup_vs_default=default["device_us"] / best["device_us"] if default else None)
        rows += timed
    cpu = device != "cuda"
    return dict(
        label="cpu dry run (TRITON_INTERPRET=1): not GPU timings" if cpu else "gpu",
        device=torch.cuda.get_device_name() if not cpu else (platform.processor() or platform.machine()),
        device_type=device, interpreter=os.environ.get("TRITON_INTERPRET") == "1", timer=timer.name,
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), torch=torch.__version__,
        triton=triton.__version__, git_commit=source_commit(), smoke=smoke, dtype="bfloat16", shapes=shape,
        warps=list(WARPS), rows=list(ROWS), flat_blocks=list(FLAT_BLOCKS), reps=reps, repeats=repeats, warmup=warmup,
        winners=winners, results=rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llama_erc.benchmarks.kernel_sweep",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="write the JSON (every row and the winners) here")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (always on without CUDA)")
    p.add_argument("--reps", type=int, default=None, help="calls per repeat (default 50, smoke 1)")
    p.add_argument("--repeats", type=int, default=None, help="repeats per config (default 3, smoke 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 5, smoke 0)")
    p.add_argument("--only", nargs="+", default=(), help="sweep only the launches whose names start so")
    args = p.parse_args(argv)
    found = bench_device(args.smoke, "dry run")
    if found is None:
        return 2
    device, smoke = found
    report = sweep(smoke, args.reps or (1 if smoke else 50), args.warmup if args.warmup is not None else
                   (0 if smoke else 5), args.repeats or (1 if smoke else 3), device, only=tuple(args.only))
    for name, w in report["winners"].items():
        default = "outside the grid" if w["default_us"] is None else f"{w['default_us']:.1f} us"
        print(f"winner {name:<36} size {w['size']:>6} warps {w['num_warps']:>2} {w['device_us']:.1f} us "
              f"(default {w['default_size']}/{w['default_num_warps']}: {default})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out} ({report['label']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
