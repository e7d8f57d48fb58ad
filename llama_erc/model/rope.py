"""Rotary frequencies for a ModelConfig: LLaMA 2's plain ones, or Llama 3's scaled ones.

    inv_freq_i = theta ** (-2i / Dh),  i = 0 .. Dh/2 - 1                               (LLaMA 2, SmolLM2)

Llama 3 (Meta's `apply_scaling`, HF's rope_type "llama3") rescales by wavelength w_i = 2 pi / inv_freq_i,
with L = original_max_seq_len, f = factor, lo / hi = low / high_freq_factor:
    w_i < L / hi          high frequencies: unchanged
    w_i > L / lo          low frequencies: inv_freq_i / f
    otherwise             s = (L / w_i - lo) / (hi - lo);  (1 - s) * inv_freq_i / f + s * inv_freq_i
The tables are computed in fp32, like Meta's and HF's; the rotation itself (kernels.apply_rope) is unchanged.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from llama_erc.model.config import ModelConfig


def rope_inv_freq(cfg: ModelConfig, device: torch.device | str | None = None) -> Tensor:
    """(Dh/2,) fp32 inverse frequencies of cfg's rotary embedding."""
    dh = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dh, 2, device=device).float() / dh))  # (Dh/2,)
    if cfg.rope_type == "default":
        return inv_freq
    L, lo, hi = cfg.rope_original_max_seq_len, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (L / wavelen - lo) / (hi - lo)
    mid = (1 - smooth) * inv_freq / cfg.rope_factor + smooth * inv_freq
    return torch.where(wavelen < L / hi, inv_freq, torch.where(wavelen > L / lo, inv_freq / cfg.rope_factor, mid))


def rope_cos_sin(positions: Tensor, cfg: ModelConfig) -> tuple[Tensor, Tensor]:
    """positions: (T,) or (B, T) integer -> cos, sin: (..., Dh/2) fp32 tables for kernels.apply_rope."""
    angles = positions.float()[..., None] * rope_inv_freq(cfg, positions.device)  # (..., Dh/2)
    return torch.cos(angles), torch.sin(angles)
