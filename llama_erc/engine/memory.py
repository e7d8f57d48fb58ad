"""Activation memory per activation-checkpointing mode, and `--activation_checkpointing auto`.

Bytes each transformer layer keeps for backward, per token, with e the activation dtype's size, D = dim,
Q = n_heads * head_dim, K = n_kv_heads * head_dim (each of k and v), F = hidden_dim, H = n_heads, and per
LoRA target t: r the rank, in_t / out_t its sizes. The model is of the fused path (Triton kernels and the fused
LoRA op, what a GPU run uses); frozen linears save no input (autograd keeps an mm's input only for the weight's
gradient):

    none       e (2D + 2F + 2Q + 2K)          block input h, h after the attention add, gate and up (SwiGLU's),
                                              q after rotary and attention's output (SDPA's), k, v
               + 8 + 4H                       two RMSNorm rstd (fp32), attention's logsumexp (fp32)
               + e D  [any of wq, wk, wv adapted: their input]    + e D [w1 or w3: theirs]
               + e F  [w2 adapted: SwiGLU's output]   (wo's input is a view of attention's output: nothing more)
               + sum_t (e r + in_t [dropout > 0: the bool mask])    the adapters' xa (N, r) and dropout masks
    block      e (2D + Q + 2K + 2F)           h, and the outputs of wq, wk, wv, wo, w1, w3 (model/recompute.py)
    selective  e (3D + 2Q + 2K + 2F) + 4H     h and every matmul output (w2's too) and attention's (o, logsumexp)
               + sum_t e (r + out_t)          the adapters' two matmul outputs
    full       e D                            the block input only

LLaMA-2-7B in bf16, r=8 on wq, wv with dropout: none 109,736 B, block 84,992 B, full 8,192 B per token per layer.

none and block are checked against what autograd saves for one block on CPU (tests/engine/test_memory.py:
block exactly; none exactly for the fused path). The eager twins keep more under none (fp32 norm temporaries,
dropout outputs in the activation dtype, SwiGLU's silu(gate)): 1.2x to 1.8x the model at the test's shapes (all
seven linears adapted, with dropout, the most), so `auto` counts EAGER_FACTOR x the model there. selective is the model only: its saved tensors live inside
torch.utils.checkpoint's own hooks.
Under full, block and selective, backward also holds one layer's recomputed activations at a time: the
estimate adds one layer of none.

auto picks the first of none, block, full whose estimate for one micro-batch (micro_batch x max_len tokens)
fits the device's free memory after the model is built (CUDA: cudaMemGetInfo; CPU: MemAvailable) with a
margin: estimate <= FIT_FRACTION x free - FIT_RESERVE (the rest covers the logits of the supervised positions,
the adapters' gradients and optimizer state, and the allocator's fragmentation). All modes compute the same bits
(tests/model/test_recompute.py), so the choice changes memory and speed only.
"""
from __future__ import annotations

from pathlib import Path

import torch

from llama_erc.model import LoRAConfig, ModelConfig

FIT_FRACTION, FIT_RESERVE = 0.8, 512 * 2**20
EAGER_FACTOR = 2.0  # none's bytes with the eager twins over the fused-path model (up to 1.8x measured, tests)
AUTO_ORDER = ("none", "block", "full")  # fastest first


def _dims(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) of each block linear."""
    d, q, k, f = cfg.dim, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.hidden_dim
    return {"wq": (d, q), "wk": (d, k), "wv": (d, k), "wo": (q, d), "w1": (d, f), "w3": (d, f), "w2": (f, d)}


def saved_bytes_per_token(cfg: ModelConfig, mode: str, dtype: torch.dtype, lora: LoRAConfig | None = None) -> int:
    """Bytes one layer keeps for backward per token under `mode` (module docstring), fused path."""
    e = torch.empty((), dtype=dtype).element_size()
    d, q, k, f, h = cfg.dim, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.hidden_dim, cfg.n_heads
    targets = lora.targets if lora is not None else ()
    dims = _dims(cfg)
    if mode == "full":
        return e * d
    if mode == "block":
        return e * (2 * d + q + 2 * k + 2 * f)
    if mode == "selective":
        return e * (3 * d + 2 * q + 2 * k + 2 * f) + 4 * h + sum(e * (lora.rank + dims[t][1]) for t in targets)
    if mode == "none":
        inputs = e * (d * any(t in targets for t in ("wq", "wk", "wv")) + d * any(t in targets for t in ("w1", "w3"))
                      + f * ("w2" in targets))
        adapters = sum(e * lora.rank + (dims[t][0] if lora.dropout > 0 else 0) for t in targets)
        return e * (2 * d + 2 * f + 2 * q + 2 * k) + 8 + 4 * h + inputs + adapters
    raise ValueError(f"saved_bytes_per_token: mode must be none, full, selective or block, got {mode!r}")


def activation_bytes(cfg: ModelConfig, mode: str, dtype: torch.dtype, lora: LoRAConfig | None, tokens: int,
                     eager: bool = False) -> int:
    """Estimated activation memory of one micro-batch of `tokens` tokens: every layer's kept bytes, plus one
    layer of none under a recomputing mode (backward's working set); eager: the twins' none (EAGER_FACTOR)."""
    none = saved_bytes_per_token(cfg, "none", dtype, lora) * (EAGER_FACTOR if eager else 1.0)
    kept = none if mode == "none" else saved_bytes_per_token(cfg, mode, dtype, lora)
    return int(tokens * (cfg.n_layers * kept + (0 if mode == "none" else none)))


def free_memory(device: torch.device) -> int:
    """Free bytes on the device now: cudaMemGetInfo on CUDA; MemAvailable (/proc/meminfo) on a CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError("--activation_checkpointing auto: cannot read the free memory of this machine "
                       "(no /proc/meminfo); pass a mode by name")


def choose_checkpointing(cfg: ModelConfig, dtype: torch.dtype, lora: LoRAConfig | None, tokens: int,
                         free_bytes: int, eager: bool = False) -> tuple[str, str]:
    """(mode, why): the first of AUTO_ORDER whose activation estimate fits free_bytes with the margin; full if none
    does (it keeps the least)."""
    if tokens <= 0:
        raise ValueError(f"choose_checkpointing: tokens per micro-batch must be positive, got {tokens}")
    budget = FIT_FRACTION * free_bytes - FIT_RESERVE
    where = f"free {free_bytes / 2**20:,.0f} MiB, budget {max(budget, 0) / 2**20:,.0f} MiB"
    for mode in AUTO_ORDER:
        need = activation_bytes(cfg, mode, dtype, lora, tokens, eager)
        if need <= budget:
            return mode, f"auto -> {mode}: activations of {tokens} tokens ~{need / 2**20:,.0f} MiB fit ({where})"
    return AUTO_ORDER[-1], (f"auto -> {AUTO_ORDER[-1]}: no mode's activations of {tokens} tokens fit ({where}, "
                            f"{AUTO_ORDER[-1]} ~{need / 2**20:,.0f} MiB); it keeps the least")
