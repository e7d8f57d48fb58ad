"""Training checkpoints: adapters, optimizer, step, RNG states and the full config, written atomically.

Layout:  <out_dir>/checkpoints/step_0000120/{adapters.safetensors, optimizer.pt, state.pt, config.json}
A checkpoint is written into a temporary sibling directory and renamed into place, so a crash mid-write
never leaves a half checkpoint under a final name; only the newest `keep_last` are kept. The data position
is a function of the step (engine/batching.py) and the lr a function of the step (engine/optim.py), so
step + RNG + optimizer state is everything a resume needs to continue bit-identically.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

# Fields that may change between a run and its resume without changing the result (the implementation choices
# compute the same function: kernels, checkpointing, the fused LoRA path, the packed rows' attention backend).
RESUME_MUTABLE = {"resume", "log_every", "save_every", "keep_last", "eval_every", "eval_max_examples", "device",
                  "kernels", "activation_checkpointing", "fused_lora", "packed_attention"}


def checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(out_dir: str | Path, *, model: nn.Module, opt: torch.optim.Optimizer, state: dict,
                    config: dict, keep_last: int) -> Path:
    root = checkpoint_dir(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{state['step']:07d}"
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(trainable_state(model), str(tmp / "adapters.safetensors"))
    torch.save(opt.state_dict(), tmp / "optimizer.pt")
    torch.save(state, tmp / "state.pt")
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    if final.exists():  # re-saving the same step (e.g. a signal right after a periodic save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(out_dir)[:-keep_last]:
        shutil.rmtree(old)
    return final


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories are ignored)."""
    root = checkpoint_dir(out_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")
                  and (p / "state.pt").exists())


def check_resume_config(saved: dict, current: dict, path: Path, defaults: dict | None = None) -> None:
    """Refuse a resume whose config changed anything but RESUME_MUTABLE. A field the checkpoint predates
    counts as its default (`defaults`), so adding a config field does not orphan older checkpoints."""
    saved = {**(defaults or {}), **saved}
    diff = {k: (saved.get(k), v) for k, v in current.items()
            if k not in RESUME_MUTABLE and _norm(saved.get(k)) != _norm(v)}
    if diff:
        lines = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in sorted(diff.items()))
        raise ValueError(f"cannot resume from {path}: the run config changed ({lines})")


def _norm(v):
    return list(v) if isinstance(v, tuple) else v


def load_trainable(model: nn.Module, file: Path) -> None:
    """Copy an adapters.safetensors into the model's trainable tensors; keys and shapes must match exactly."""
    if not file.is_file():
        raise ValueError(f"{file}: no such adapter file")
    adapters = load_file(str(file))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(adapters) != set(params):
        raise ValueError(f"{file}: missing {sorted(set(params) - set(adapters))}, "
                         f"unexpected {sorted(set(adapters) - set(params))}")
    for name, t in adapters.items():
        if params[name].shape != t.shape:
            raise ValueError(f"{file}: {name} has shape {tuple(t.shape)}, model expects {tuple(params[name].shape)}")
    with torch.no_grad():
        for name, t in adapters.items():
            params[name].copy_(t)


def load_checkpoint(path: Path, *, model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """Load adapters + optimizer from `path`; returns the saved state dict (step, rng, ...)."""
    load_trainable(model, path / "adapters.safetensors")
    opt.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    return torch.load(path / "state.pt", weights_only=True)


def run_config(train_cfg, model_cfg) -> dict:
    return {"train": asdict(train_cfg), "model": asdict(model_cfg)}
