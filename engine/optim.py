"""Optimizer and learning-rate schedule: AdamW over the adapters only; linear warmup, then cosine decay.

lr_at is a pure function of the step, so the scheduler's whole state is the step number.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(params: list[nn.Parameter], *, lr: float, betas: tuple[float, float], eps: float,
                   weight_decay: float) -> torch.optim.AdamW:
    if not params:
        raise ValueError("no trainable parameters: apply LoRA before building the optimizer")
    fused = all(p.is_cuda for p in params)  # fused AdamW exists for CUDA tensors only
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                             fused=fused or None)


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): warmup (step+1)/warmup, then cosine to min_lr."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr
