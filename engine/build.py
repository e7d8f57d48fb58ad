"""Build the model a run trains: base weights (a checkpoint directory, or a preset with random weights) ->
dtype/device -> kernels and activation-checkpointing switches -> LoRA adapters, the only trainable tensors."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from data import PromptCodec, build_codec, load_tokenizer
from data.tokenizer import DIR_LOOKUP  # what load_tokenizer looks for in a directory
from model import MODEL_PRESETS, ModelConfig, Transformer, preset
from model.checkpoint import load_pretrained
from model.lora import LoRAConfig, apply_lora, set_lora_fused

from .config import TrainConfig
from .runtime import Runtime



def lora_config(cfg: TrainConfig) -> LoRAConfig:
    return LoRAConfig(rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=cfg.lora_targets)


def resolve_tokenizer_path(model: str, tokenizer: str = "") -> Path:
    """--tokenizer (a file or a directory), else the checkpoint's own: a .gguf model file's embedded vocabulary,
    the model directory (tokenizer.json, tokenizer.model or its .gguf, data.load_tokenizer's order), or the
    parent directory's tokenizer.model (Meta's download layout)."""
    if tokenizer:
        if not Path(tokenizer).exists():
            raise ValueError(f"--tokenizer {tokenizer}: no such file or directory")
        return Path(tokenizer)
    model_path = Path(model)
    if model_path.is_file():
        return model_path
    if model_path.is_dir():
        if any(any(model_path.glob(pattern)) for pattern in DIR_LOOKUP):
            return model_path
        if (model_path.parent / "tokenizer.model").is_file():
            return model_path.parent / "tokenizer.model"
    raise ValueError(f"no tokenizer: pass --tokenizer (looked for {', '.join(DIR_LOOKUP)} in {model_path} and "
                     "tokenizer.model in its parent)")


def load_codec(model: str, tokenizer: str, prompt_format: str) -> PromptCodec:
    """The run's tokenizer (found as resolve_tokenizer_path says) in its prompt format."""
    return build_codec(load_tokenizer(resolve_tokenizer_path(model, tokenizer)), prompt_format)


def build_base_model(model: str, rt: Runtime, *, vocab_size: int | None = None, seed: int = 0,
                     checkpointing: bool | str = "none") -> tuple[Transformer, ModelConfig]:
    """A checkpoint directory is loaded; a preset name gets random N(0, 0.02) weights (vocab from the tokenizer)."""
    if Path(model).is_dir() or Path(model).suffix.lower() == ".gguf":
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
        net.tie_weights()  # to_empty gave the tied output its own storage
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
