"""Peak training memory of the engine: LoRA on LLaMA-2-7B (random weights), bf16, activation checkpointing.

    python scripts/measure_train_memory.py                     # on a GPU: the issue-4 target configuration
    python scripts/measure_train_memory.py --preset tiny --device cpu --dtype fp32   # CPU smoke of the script

Builds the model on the meta device and materialises it directly on the target device (7B never touches host
RAM), applies LoRA (r=8 on wq, wv by default), runs a few optimizer steps of micro-batch 8 x 512 tokens through
the engine's own loss (SupervisedLoss) and AdamW, and reports torch.cuda.max_memory_allocated / reserved
(CPU: peak RSS). Writes JSON with the device, date and commit. A script, not a test: run it on the machine
whose number you report.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.build import build_base_model  # noqa: E402
from engine.loss import SupervisedLoss  # noqa: E402
from engine.optim import make_optimizer, trainable_parameters  # noqa: E402
from engine.provenance import source_commit, source_dirty  # noqa: E402
from engine.runtime import peak_memory_gb, setup_runtime  # noqa: E402
from model.lora import LoRAConfig, apply_lora  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="llama-2-7b")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--kernels", default="auto", choices=("auto", "on", "off"))
    p.add_argument("--checkpointing", default="full", choices=("none", "full", "selective"))
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
    model, mcfg = build_base_model(args.preset, rt, seed=0, checkpointing=args.checkpointing)
    apply_lora(model, LoRAConfig(rank=args.rank, alpha=2 * args.rank, dropout=0.05,
                                 targets=tuple(args.targets.split(","))))
    loss_fn = SupervisedLoss(model)
    params = trainable_parameters(model)
    opt = make_optimizer(params, lr=3e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, mcfg.vocab_size, (args.micro_batch, args.seq_len), generator=gen)  # (B, T)
    labels = ids.clone()
    if args.supervised:
        labels[:, :-args.supervised] = -100
    ids, labels = ids.to(rt.device), labels.to(rt.device)
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = loss_fn(ids, labels) / max(1, int((labels[:, 1:] != -100).sum()))  # mean over supervised tokens
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    result = {
        "device": torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else "cpu",
        "date": datetime.date.today().isoformat(),
        "commit": source_commit(), "dirty": source_dirty(),
        "config": {**vars(args), "out": str(args.out), "use_kernels": rt.use_kernels},
        "n_params": mcfg.n_params, "n_trainable": sum(p.numel() for p in params),
        "peak_memory_gb": peak_memory_gb(rt.device),
        "peak_reserved_gb": (torch.cuda.max_memory_reserved(rt.device) / 2**30) if rt.device.type == "cuda" else None,
        "step_time_s": sorted(times)[len(times) // 2],
        "loss": loss.item(),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
