"""Test helpers: tiny random HF LlamaForCausalLM models and the three checkpoint forms derived from them.

transformers is a test-only reference; test modules importorskip it before importing this file.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from model.config import meta_hidden_dim
from model.convert import main as convert_main
from model.hf_keys import hf_to_meta_key, permute_to_meta, qk_heads


@dataclass(frozen=True)
class TinySpec:
    name: str
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    layers: int = 2
    eps: float = 1e-5
    theta: float = 10000.0
    attn: str = "eager"


SPECS = [
    # GQA, nothing a power of two, non-default eps and theta
    TinySpec("gqa_odd", hidden=48, heads=6, kv_heads=2, intermediate=100, vocab=97, eps=1e-6, theta=5000.0),
    # MHA, 5 heads of 8
    TinySpec("mha_odd", hidden=40, heads=5, kv_heads=5, intermediate=72, vocab=61, attn="sdpa"),
    # MQA (one KV head), three layers
    TinySpec("mqa", hidden=32, heads=4, kv_heads=1, intermediate=88, vocab=50, layers=3, attn="sdpa"),
]

# Meta's model-parallel split axis (fairscale ParallelEmbedding / Column- / RowParallelLinear), written
# here independently of model/formats.py so the loader's table is tested, not re-used.
_SPLIT = {"tok_embeddings": 1, "output": 0, "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "wo": 1, "w2": 1}


def make_hf_model(spec: TinySpec, seed: int = 0) -> LlamaForCausalLM:
    """fp32 LlamaForCausalLM with O(1)-scale random weights (HF's 0.02 init gives near-zero logits)
    and random norm weights, so a swapped norm or a wrong q/k permutation changes the logits."""
    cfg = LlamaConfig(hidden_size=spec.hidden, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
                      intermediate_size=spec.intermediate, vocab_size=spec.vocab, num_hidden_layers=spec.layers,
                      max_position_embeddings=64, rms_norm_eps=spec.eps, rope_theta=spec.theta,
                      tie_word_embeddings=False, attn_implementation=spec.attn)
    model = LlamaForCausalLM(cfg).float().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
    return model


def save_hf(model: LlamaForCausalLM, path: Path, max_shard_size: str = "8KB") -> Path:
    """Form 3, forced into several shards plus model.safetensors.index.json."""
    model.save_pretrained(path, safe_serialization=True, max_shard_size=max_shard_size)
    assert len(list(path.glob("model-*.safetensors"))) >= 3, "expected several HF shards"
    return path


def meta_state_dict(model: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    """HF weights renamed to Meta keys, wq/wk rows back in Meta's interleaved rotary order."""
    cfg = model.config
    out = {}
    for k, v in model.state_dict().items():
        mk = hf_to_meta_key(k)
        if mk is None:
            continue
        heads = qk_heads(mk, cfg.num_attention_heads, cfg.num_key_value_heads)
        out[mk] = (v if heads is None else permute_to_meta(v, heads)).detach().clone()
    return out


def meta_style_params(spec: TinySpec) -> dict:
    """params.json as Meta writes it: multiple_of/ffn_dim_multiplier for the FFN size, vocab_size -1."""
    base = int(2 * 4 * spec.hidden / 3)
    multiplier = spec.intermediate / base
    multiple_of = 4 if spec.intermediate % 4 == 0 else 1
    assert meta_hidden_dim(spec.hidden, multiple_of, multiplier) == spec.intermediate, spec
    return {"dim": spec.hidden, "n_layers": spec.layers, "n_heads": spec.heads, "n_kv_heads": spec.kv_heads,
            "vocab_size": -1, "multiple_of": multiple_of, "ffn_dim_multiplier": multiplier,
            "norm_eps": spec.eps, "rope_theta": spec.theta}


def write_meta_pth(state: dict[str, torch.Tensor], params: dict, path: Path, n_shards: int = 2) -> Path:
    """Form 2: params.json + consolidated.00.pth .. as n_shards model-parallel shards (+ a rope.freqs buffer)."""
    path.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n_shards)]
    for k, v in state.items():
        module = k.split(".")[-2]
        axis = _SPLIT.get(module)
        parts = [v] * n_shards if axis is None else torch.tensor_split(v, n_shards, dim=axis)
        for shard, part in zip(shards, parts):
            shard[k] = part.clone()  # own storage: torch.save would otherwise write the whole base tensor
    for i, shard in enumerate(shards):
        shard["rope.freqs"] = torch.rand(params["dim"] // params["n_heads"] // 2)  # Meta ships it; loader ignores
        torch.save(shard, path / f"consolidated.{i:02d}.pth")
    (path / "params.json").write_text(json.dumps(params))
    return path


def build_forms(spec: TinySpec, root: Path, seed: int = 0) -> tuple[LlamaForCausalLM, dict[str, Path]]:
    """The HF model and its three forms: hf (form 3, sharded), meta_st (form 1, via model.convert),
    meta_pth (form 2, two model-parallel shards, Meta-style params.json with vocab_size -1)."""
    model = make_hf_model(spec, seed)
    hf = save_hf(model, root / "hf")
    (hf / "tokenizer.model").write_bytes(b"not a real sentencepiece model")  # convert copies it
    assert convert_main([str(hf), str(root / "meta_st"), "--max-shard-size", "10KB"]) == 0
    pth = write_meta_pth(meta_state_dict(model), meta_style_params(spec), root / "meta_pth")
    return model, {"hf": hf, "meta_st": root / "meta_st", "meta_pth": pth}


def tokens_for(spec: TinySpec, batch: int = 2, length: int = 13, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, spec.vocab, (batch, length), generator=torch.Generator().manual_seed(seed))
