"""Peak training memory of the engine: LoRA on LLaMA-2-7B (random weights), bf16, activation checkpointing.

    python -m llama_erc.benchmarks.train_memory                  # on a GPU: the issue-4 target configuration
    python -m llama_erc.benchmarks.train_memory --preset tiny --device cpu --dtype fp32   # CPU smoke

Builds the model training builds (engine.build.build_lora_model: on the meta device, materialised directly on
the target device, so 7B never touches host RAM; LoRA r=8 on wq, wv by default), runs a few optimizer steps of
micro-batch 8 x 512 tokens through the training step itself (engine.step.train_step: the engine's loss, clipping,
AdamW), and reports torch.cuda.max_memory_allocated / reserved (CPU: peak RSS). Writes JSON with the device,
date and commit. A benchmark, not a test: run it on the machine whose number you report.
"""
from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch

from llama_erc.benchmarks.provenance import source_commit, source_dirty
from llama_erc.data import IGNORE_INDEX, Sequence
from llama_erc.engine.build import build_lora_model
from llama_erc.engine.loss import SupervisedLoss
from llama_erc.engine.optim import OptimConfig, make_optimizer, trainable_parameters
from llama_erc.engine.packing import BatchLayout
from llama_erc.engine.runtime import DTYPE_CHOICES, peak_memory_gb, setup_runtime
from llama_erc.engine.step import train_step
from llama_erc.model import ACTIVATION_CHECKPOINTING, LoRAConfig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llama_erc.benchmarks.train_memory", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="llama-2-7b")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="bf16", choices=DTYPE_CHOICES)
    p.add_argument("--kernels", default="auto", choices=("auto", "on", "off"))
    p.add_argument("--checkpointing", default="full", choices=ACTIVATION_CHECKPOINTING)
    p.add_argument("--base_quant", default="none", choices=("none", "nf4", "q8_0"),
                   help="hold the frozen base quantized (model/quant.py); the preset's random weights are drawn, "
                        "then quantized, before the peak is reset")
    p.add_argument("--micro_batch", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=512)
    p.add_argument("--supervised", type=int, default=4, help="supervised tokens at the end of each row (ERC-like); "
                   "0 = every token")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default="wq,wv")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    rt = setup_runtime(args.device, args.dtype, args.kernels)
    lora = LoRAConfig(rank=args.rank, alpha=2 * args.rank, dropout=0.05, targets=tuple(args.targets.split(",")))
    model, mcfg = build_lora_model(args.preset, rt, lora, seed=0, activation_checkpointing=args.checkpointing,
                                   base_quant=args.base_quant)
    loss_fn = SupervisedLoss(model)
    params = trainable_parameters(model)
    opt = make_optimizer(params, OptimConfig(lr=3e-4))
    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(3, mcfg.vocab_size, (args.micro_batch, args.seq_len), generator=gen).tolist()  # (B, T)
    n_unsupervised = args.seq_len - args.supervised if args.supervised else 0
    batch = [Sequence(tuple(r), tuple([IGNORE_INDEX] * n_unsupervised + r[n_unsupervised:])) for r in rows]
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        result = train_step(loss_fn, opt, params, [batch], layout=BatchLayout(max_len=args.seq_len), pad_id=0,
                            weight_sum=sum(s.supervised_weight for s in batch), grad_clip=1.0, device=rt.device)
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    result = {
        "device": torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else "cpu",
        "date": datetime.date.today().isoformat(),
        "commit": source_commit(), "dirty": source_dirty(),
        "config": {**vars(args), "out": args.out and str(args.out), "use_kernels": rt.use_kernels,
                   "dtype_reason": rt.dtype_reason},
        "n_params": mcfg.n_params, "n_trainable": sum(p.numel() for p in params),
        "peak_memory_gb": peak_memory_gb(rt.device),
        "peak_reserved_gb": (torch.cuda.max_memory_reserved(rt.device) / 2**30) if rt.device.type == "cuda" else None,
        "step_time_s": sorted(times)[len(times) // 2],
        "loss": result.loss,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
