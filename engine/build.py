"""Build the model a run trains: base weights (a checkpoint directory, or a preset with random weights) ->
dtype/device -> kernels and activation-checkpointing switches -> LoRA adapters, the only trainable tensors."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from model import MODEL_PRESETS, ModelConfig, Transformer, preset
from model.checkpoint import load_pretrained
from model.lora import LoRAConfig, apply_lora, set_lora_fused

from .config import TrainConfig
from .runtime import Runtime


def lora_config(cfg: TrainConfig) -> LoRAConfig:
    return LoRAConfig(rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=cfg.lora_targets)


def resolve_tokenizer_path(cfg: TrainConfig) -> Path:
    """--tokenizer, else tokenizer.model in the checkpoint directory or its parent (Meta's download layout)."""
    if cfg.tokenizer:
        path = Path(cfg.tokenizer)
        if not path.is_file():
            raise ValueError(f"--tokenizer {path}: no such file")
        return path
    model_dir = Path(cfg.model)
    for candidate in (model_dir / "tokenizer.model", model_dir.parent / "tokenizer.model"):
        if model_dir.is_dir() and candidate.is_file():
            return candidate
    raise ValueError(f"no tokenizer: pass --tokenizer (looked for tokenizer.model in {model_dir} and its parent)")


def build_base_model(model: str, rt: Runtime, *, vocab_size: int | None = None, seed: int = 0,
                     checkpointing: bool | str = "none") -> tuple[Transformer, ModelConfig]:
    """A checkpoint directory is loaded; a preset name gets random N(0, 0.02) weights (vocab from the tokenizer)."""
    if Path(model).is_dir():
        net = load_pretrained(model, dtype=rt.dtype, device=rt.device)
        mcfg = net.config
    elif model in MODEL_PRESETS:
        mcfg = preset(model)
        if vocab_size is not None:
            mcfg = replace(mcfg, vocab_size=vocab_size)
        with torch.device("meta"):
            net = Transformer(mcfg)
        net.to_empty(device=rt.device)
        net.to(rt.dtype)
        net.init_weights(generator=torch.Generator(rt.device).manual_seed(seed))
    else:
        raise ValueError(f"--model {model!r} is neither a checkpoint directory nor a preset "
                         f"({', '.join(MODEL_PRESETS)})")
    if vocab_size is not None and vocab_size > mcfg.vocab_size:
        raise ValueError(f"the tokenizer has {vocab_size} pieces but the model's vocabulary is {mcfg.vocab_size}")
    net.use_kernels = rt.use_kernels
    net.checkpointing = checkpointing
    return net, mcfg


def build_lora_model(cfg: TrainConfig, rt: Runtime, vocab_size: int | None) -> tuple[Transformer, ModelConfig]:
    net, mcfg = build_base_model(cfg.model, rt, vocab_size=vocab_size, seed=cfg.seed,
                                 checkpointing=cfg.activation_checkpointing)
    torch.manual_seed(cfg.seed)  # adapter init (kaiming A) is seeded independently of the base weights
    apply_lora(net, lora_config(cfg), verbose=rt.is_main)
    set_lora_fused(net, cfg.fused_lora)
    return net, mcfg
