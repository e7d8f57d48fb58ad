"""LoRA adapters in PEFT's format: export_peft writes what peft.PeftModel.from_pretrained loads, import_peft reads it.

PEFT export: keys `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` (and lora_B, other
projections via hf_keys.LINEAR_META_TO_HF), the format peft 0.21 writes with save_pretrained. B's rows
of wq/wk follow the output rows of W, so they get the same Meta -> HF rotary permutation as the weights
(hf_keys.permute_to_hf, by n_heads for wq and n_kv_heads for wk); A indexes the input and is unchanged.
"""
from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from llama_erc.model.config import ModelConfig
from llama_erc.model.hf_keys import LINEAR_META_TO_HF, permute_to_hf, permute_to_meta
from llama_erc.model.lora import (VALID_TARGETS, LoRAConfig, _check_keys, _copy_into, _lora_modules, _read_safetensors,
                                  apply_lora, lora_config_of, lora_state_dict)

_PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> LlamaForCausalLM
_HF_SHORT_TO_META = {hf.rsplit(".", 1)[1]: meta for meta, hf in LINEAR_META_TO_HF.items()}  # q_proj -> wq


def _peft_key(meta_key: str) -> str:
    """'layers.3.attention.wq.lora_b' -> 'base_model.model.model.layers.3.self_attn.q_proj.lora_B.weight'."""
    _, i, _, lin, ab = meta_key.split(".")
    return f"{_PEFT_PREFIX}model.layers.{i}.{LINEAR_META_TO_HF[lin]}.lora_{ab[-1].upper()}.weight"


def _qk_heads(meta_key: str, cfg: ModelConfig) -> int | None:
    """Heads to permute B's rows by (wq: n_heads, wk: n_kv_heads); None when rows need no permutation."""
    if meta_key.endswith(".lora_b"):
        return {"wq": cfg.n_heads, "wk": cfg.n_kv_heads}.get(meta_key.split(".")[-2])
    return None


def export_peft(model: nn.Module, out_dir: str | Path, base_model_name_or_path: str) -> None:
    """Write adapter_config.json + adapter_model.safetensors loadable by peft.PeftModel.from_pretrained."""
    cfg, mcfg = lora_config_of(model), model.config
    tensors = {}
    for k, v in lora_state_dict(model).items():
        heads = _qk_heads(k, mcfg)
        tensors[_peft_key(k)] = (permute_to_hf(v, heads) if heads else v).contiguous()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    peft_cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
        "target_modules": [LINEAR_META_TO_HF[t].rsplit(".", 1)[1] for t in cfg.targets],
        # the plain-LoRA choices this module implements, stated so PEFT's defaults cannot change them
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True,
    }
    (out / "adapter_config.json").write_text(json.dumps(peft_cfg, indent=2) + "\n")


def import_peft(model: nn.Module, adapter_dir: str | Path, dropout: float | None = None) -> nn.Module:
    """Inverse of export_peft: apply LoRA from a PEFT adapter_config.json (if the model has none) and load
    adapter_model.safetensors into it. Only plain LoRA on the seven LLaMA linears is supported."""
    d = Path(adapter_dir)
    pc = json.loads((d / "adapter_config.json").read_text())
    unsupported = {k: pc.get(k) for k, ok in (("peft_type", "LORA"), ("bias", "none"))
                   if pc.get(k, ok) != ok}
    unsupported |= {k: pc[k] for k in ("use_rslora", "use_dora", "fan_in_fan_out", "rank_pattern",
                                       "alpha_pattern", "layers_to_transform", "modules_to_save") if pc.get(k)}
    targets = pc.get("target_modules")
    if not isinstance(targets, list) or any(t.rsplit(".", 1)[-1] not in _HF_SHORT_TO_META for t in targets):
        unsupported["target_modules"] = targets
    if unsupported:
        raise ValueError(f"{d}: unsupported PEFT adapter settings {unsupported}")
    metas = {_HF_SHORT_TO_META[t.rsplit(".", 1)[-1]] for t in targets}
    cfg = LoRAConfig(rank=int(pc["r"]), alpha=pc["lora_alpha"],
                     dropout=pc.get("lora_dropout", 0.0) if dropout is None else dropout,
                     targets=tuple(t for t in VALID_TARGETS if t in metas))
    if not _lora_modules(model):
        apply_lora(model, cfg)
    ours = lora_config_of(model)
    if (cfg.rank, cfg.alpha, cfg.targets) != (ours.rank, ours.alpha, ours.targets):
        raise ValueError(f"{d}: PEFT adapter is {cfg}, the model has {ours}")
    path = d / "adapter_model.safetensors"
    hf, _ = _read_safetensors(path)
    expected = lora_state_dict(model)
    by_peft = {_peft_key(k): k for k in expected}
    _check_keys({_peft_key(k): v for k, v in expected.items()}, {k: tuple(v.shape) for k, v in hf.items()},
                str(path))
    tensors = {}
    for pk, v in hf.items():
        k = by_peft[pk]
        heads = _qk_heads(k, model.config)
        tensors[k] = permute_to_meta(v, heads) if heads else v
    _copy_into(model, tensors)
    return model
