"""The one HF <-> Meta name table, and the q/k row permutation between the two rotary layouts.

Meta rotates interleaved pairs (x[2i], x[2i+1]); HF's LlamaForCausalLM rotates halves (x[i], x[i + Dh/2]).
HF's conversion script permutes the rows of wq/wk per head so that rotate-half on HF rows equals Meta's
interleaved rotation on Meta rows:
    to HF:   rows viewed (H, Dh/2, 2)  -> transposed to (H, 2, Dh/2)
    to Meta: rows viewed (H, 2, Dh/2)  -> transposed to (H, Dh/2, 2)
The same permutation applies to anything indexed by those output rows (a LoRA B matrix, for instance).
"""
from __future__ import annotations

import re

from torch import Tensor

# Meta suffix within a layer -> HF suffix within a layer
_LAYER_MAP = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_MAP = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Meta module name of a linear -> HF module name (for LoRA targets / PEFT export)
LINEAR_META_TO_HF = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj",
                     "wo": "self_attn.o_proj", "w1": "mlp.gate_proj", "w2": "mlp.down_proj", "w3": "mlp.up_proj"}
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_HF_TO_META_LAYER = {v: k for k, v in _LAYER_MAP.items()}
_HF_TO_META_TOP = {v: k for k, v in _TOP_MAP.items()}


def meta_to_hf_key(key: str) -> str:
    if key in _TOP_MAP:
        return _TOP_MAP[key]
    m = _LAYER_RE.match(key)
    if m and m.group(2) in _LAYER_MAP:
        return f"model.layers.{m.group(1)}.{_LAYER_MAP[m.group(2)]}"
    raise KeyError(f"no HF name for Meta key {key!r}")


def hf_to_meta_key(key: str) -> str | None:
    """HF key -> Meta key; None for HF-only buffers that carry no weights (rotary inv_freq)."""
    if key in _HF_TO_META_TOP:
        return _HF_TO_META_TOP[key]
    m = _HF_LAYER_RE.match(key)
    if m:
        if m.group(2) == "self_attn.rotary_emb.inv_freq":
            return None
        if m.group(2) in _HF_TO_META_LAYER:
            return f"layers.{m.group(1)}.{_HF_TO_META_LAYER[m.group(2)]}"
    raise KeyError(f"no Meta name for HF key {key!r}")


def permute_to_hf(w: Tensor, n_heads: int) -> Tensor:
    """Rows of wq/wk (n_heads * Dh, in) from Meta's interleaved order to HF's rotate-half order."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def permute_to_meta(w: Tensor, n_heads: int) -> Tensor:
    """Inverse of permute_to_hf: HF rotate-half row order -> Meta interleaved row order."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def qk_heads(meta_key: str, n_heads: int, n_kv_heads: int) -> int | None:
    """How many heads to permute by for a Meta key: n_heads for wq, n_kv_heads for wk, None otherwise."""
    if meta_key.endswith("attention.wq.weight"):
        return n_heads
    if meta_key.endswith("attention.wk.weight"):
        return n_kv_heads
    return None
