"""engine/memory.py: the per-layer activation model against what autograd saves for one block on CPU, and the
auto choice of activation checkpointing."""
from __future__ import annotations

import pytest
import torch

from llama_erc.engine.memory import (EAGER_FACTOR, activation_bytes, choose_checkpointing, free_memory,
                                     saved_bytes_per_token)
from llama_erc.kernels import select_ops
from llama_erc.model.config import ModelConfig
from llama_erc.model.llama import Transformer
from llama_erc.model.lora import LoRAConfig, apply_lora
from llama_erc.model.recompute import block_recompute
from llama_erc.model.rope import rope_cos_sin

CFG = ModelConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=96, vocab_size=97, max_seq_len=64)
B, T = 2, 16


def _measured(mode: str, lora: LoRAConfig, dtype: torch.dtype, fused_path: bool) -> float:
    """Bytes per token that one block's forward hands autograd to keep (each storage once; parameters and the
    rotary tables, shared by all layers, excluded)."""
    model = Transformer(CFG)
    model.init_weights(generator=torch.Generator().manual_seed(0))
    model.to(dtype)
    apply_lora(model, lora, verbose=False)
    model.ops = select_ops(triton=fused_path, fused_lora=fused_path)
    block = model.train().layers[0]
    h = torch.randn(B, T, CFG.dim, dtype=dtype, requires_grad=True)  # a later layer's input: it needs a gradient
    cos, sin = rope_cos_sin(torch.arange(T), CFG)
    shared = {t.untyped_storage().data_ptr() for t in (*model.parameters(), cos, sin)}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in shared:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block_recompute(block, h, cos, sin) if mode == "block" else block(h, cos, sin)
    return sum(kept.values()) / (B * T)


LORAS = [LoRAConfig(rank=4, alpha=8, dropout=0.1, targets=("wq", "wv")),
         LoRAConfig(rank=4, alpha=8, dropout=0.0, targets=("wq", "wv")),
         LoRAConfig(rank=2, alpha=8, dropout=0.05, targets=("wq", "wk", "wv", "wo", "w1", "w2", "w3")),
         LoRAConfig(rank=4, alpha=8, dropout=0.1, targets=("w1",))]


@pytest.mark.parametrize("lora", LORAS, ids=lambda c: f"{'+'.join(c.targets)}-p{c.dropout}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["none", "block"])
def test_saved_bytes_match_autograd_on_the_fused_path(mode, dtype, lora):
    """Triton kernels (interpreter) and the fused LoRA op: the model is exact, byte for byte."""
    assert _measured(mode, lora, dtype, fused_path=True) == saved_bytes_per_token(CFG, mode, dtype, lora)


@pytest.mark.parametrize("lora", LORAS[:1] + LORAS[2:3], ids=["wq+wv", "all"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_eager_twins_keep_more_within_the_factor(dtype, lora):
    """The twins keep more under none (fp32 norm temporaries, dropout outputs), under EAGER_FACTOR x the model;
    block keeps the same with them (its kept set does not depend on the ops)."""
    model_none = saved_bytes_per_token(CFG, "none", dtype, lora)
    eager_none = _measured("none", lora, dtype, fused_path=False)
    assert model_none < eager_none <= EAGER_FACTOR * model_none
    assert _measured("block", lora, dtype, fused_path=False) == saved_bytes_per_token(CFG, "block", dtype, lora)


def test_mode_order_and_7b_numbers():
    """LLaMA-2-7B, bf16, r=8 on wq,wv with dropout: full < block < none per layer, and the stated formulas."""
    from llama_erc.model import preset
    cfg, lora = preset("llama-2-7b"), LoRAConfig(rank=8, alpha=16, dropout=0.05, targets=("wq", "wv"))
    per = {m: saved_bytes_per_token(cfg, m, torch.bfloat16, lora) for m in ("none", "full", "selective", "block")}
    assert per["full"] == 2 * 4096
    assert per["block"] == 2 * (2 * 4096 + 4096 + 2 * 4096 + 2 * 11008) == 84_992  # as the module docstring says
    assert per["none"] == 2 * (2 * 4096 + 2 * 11008 + 2 * 4096 + 2 * 4096) + 8 + 4 * 32 + 2 * 4096 \
        + 2 * (2 * 8 + 4096) == 109_736
    assert per["full"] < per["block"] < per["selective"] and per["block"] < per["none"]
    with pytest.raises(ValueError, match="mode must be none, full, selective or block, got 'auto'"):
        saved_bytes_per_token(cfg, "auto", torch.bfloat16, lora)


def test_choose_checkpointing_picks_the_fastest_that_fits():
    lora, tokens, cfg = LORAS[0], 4096, ModelConfig(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=96)
    need = {m: activation_bytes(cfg, m, torch.bfloat16, lora, tokens) for m in ("none", "block", "full")}
    assert need["full"] < need["block"] < need["none"]

    def pick(free: float) -> str:
        return choose_checkpointing(cfg, torch.bfloat16, lora, tokens, int(free))[0]

    reserve = 512 * 2**20
    assert pick((need["none"] + reserve) / 0.8 + 1) == "none"
    assert pick((need["none"] + reserve) / 0.8 - 2**10) == "block"
    assert pick((need["block"] + reserve) / 0.8 - 2**10) == "full"
    mode, why = choose_checkpointing(CFG, torch.bfloat16, lora, tokens, 0)
    assert mode == "full" and "no mode's activations" in why
    with pytest.raises(ValueError, match="tokens per micro-batch must be positive, got 0"):
        choose_checkpointing(CFG, torch.bfloat16, lora, 0, 2**30)


def test_free_memory_on_cpu_is_positive():
    assert free_memory(torch.device("cpu")) > 0
