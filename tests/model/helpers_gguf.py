"""Test helper: a GGUF file written from a tiny HF LlamaForCausalLM, laid out the way llama.cpp's HF -> GGUF
converter lays out a LLaMA (written here from the format's description, independently of model/gguf.py):

  * metadata: general.architecture "llama" and the `llama.*` hyper-parameters (context_length, embedding_length,
    block_count, feed_forward_length, rope.dimension_count, attention.head_count(_kv),
    attention.layer_norm_rms_epsilon, rope.freq_base, vocab_size);
  * tensors under llama.cpp's names (token_embd, blk.N.attn_q, ..., output_norm, output), q/k rows permuted from
    HF's rotate-half order into the interleaved-pair order of GGML's "normal" rope; no output.weight when the
    embeddings are tied;
  * Llama 3 rotary scaling as a `rope_freqs.weight` F32 tensor of per-frequency wavelength factors
    (1 for high frequencies, `factor` for low ones, 1 / ((1 - s) / factor + s) in between);
  * 1-D tensors (norms) always F32; any 2-D tensor in the type `types` gives it (default F32).

The gguf package is imported where it is used (helpers_hf imports this module with or without it).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight"}
_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
          "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def llama_cpp_name(hf_key: str) -> str:
    """'model.layers.3.self_attn.q_proj.weight' -> 'blk.3.attn_q.weight'."""
    if hf_key in _TOP:
        return _TOP[hf_key]
    _, _, i, rest = hf_key.split(".", 3)
    return f"blk.{i}.{_LAYER[rest.rsplit('.', 1)[0]]}.weight"


def hf_rows_to_interleaved(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Per head, rows [first half | second half] (rotate-half pairs (j, j + d/2)) -> pairs (2j, 2j + 1)."""
    d = w.shape[0] // n_head
    return w.reshape(n_head, 2, d // 2, -1).transpose(1, 2).reshape(w.shape)  # (H, 2, d/2, in) -> (H, d/2, 2, in)


def llama3_rope_factors(head_dim: int, theta: float, factor: float, low: float, high: float,
                        original_ctx: int) -> np.ndarray:
    """(head_dim/2,) f32 wavelength factors, as the converter computes them from HF's rope_scaling."""
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < original_ctx / high:
            out.append(1.0)
        elif wavelen > original_ctx / low:
            out.append(factor)
        else:
            s = (original_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - s) / factor + s))
    return np.asarray(out, dtype=np.float32)


def _add(w, name: str, arr: np.ndarray, type_name: str) -> None:
    import gguf
    qtype = gguf.GGMLQuantizationType[type_name]
    if type_name == "F32":
        w.add_tensor(name, arr.astype(np.float32))
    elif type_name == "F16":
        w.add_tensor(name, arr.astype(np.float16))
    else:  # BF16 and block quantizations: bytes (rows, bytes per row) plus the type
        w.add_tensor(name, gguf.quants.quantize(arr.astype(np.float32), qtype), raw_dtype=qtype)


def write_gguf(hf_model, path: Path, *, types: dict[str, str] | None = None, arch: str = "llama",
               extra: dict[str, np.ndarray] | None = None, rope_factors: np.ndarray | None = None,
               skip: set[str] = frozenset()) -> Path:
    """Write hf_model as a GGUF file at path (see the module docstring). types: llama.cpp name -> GGUF type name
    for 2-D tensors (default F32). extra: more raw tensors (numpy, their own dtype), e.g. a bias to be refused;
    skip: llama.cpp names of the model's tensors not to write (an extra tensor may take the name)."""
    import gguf
    cfg = hf_model.config
    types = types or {}
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-test")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_rope_dimension_count(head_dim)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(float((cfg.rope_parameters or {}).get("rope_theta", 10000.0)))
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    if rope_factors is not None:
        w.add_tensor("rope_freqs.weight", rope_factors.astype(np.float32))
    tied = cfg.tie_word_embeddings
    for k, v in hf_model.state_dict().items():
        if k == "lm_head.weight" and tied:
            continue  # tied: the converter writes the embedding only
        v = v.detach().float()
        if k.endswith("q_proj.weight"):
            v = hf_rows_to_interleaved(v, cfg.num_attention_heads)
        elif k.endswith("k_proj.weight"):
            v = hf_rows_to_interleaved(v, cfg.num_key_value_heads)
        name = llama_cpp_name(k)
        if name in skip:
            continue
        _add(w, name, v.numpy(), types.get(name, "F32") if v.dim() == 2 else "F32")
    for name, arr in (extra or {}).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def transformers_gguf_model(path: Path):
    """transformers' own GGUF loader on path (fp32)."""
    from transformers import LlamaForCausalLM
    return LlamaForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
