"""Test helpers: tiny random HF LlamaForCausalLM models and the checkpoint forms derived from them.

Forms: hf (HF safetensors, config.json as transformers 5 writes it: `rope_parameters`), hf_rope_scaling (the same
weights, config.json hand-written in transformers 4's spelling: `rope_scaling` + top-level rope_theta; Llama 3
specs only), meta_st (engine/convert.py), meta_pth (Meta's consolidated.NN.pth + params.json with use_scaled_rope)
and gguf (llama.cpp's layout, tests/model/helpers_gguf.py; all F32 so it holds HF's exact weights).

transformers is a test-only reference; test modules importorskip it before importing this file.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llama_erc.model.config import meta_hidden_dim
from llama_erc.engine.convert import main as convert_main
from llama_erc.model.hf_keys import hf_to_meta_key, permute_to_meta, qk_heads
from tests.model.helpers_gguf import llama3_rope_factors, write_gguf

# Llama 3 rotary scaling (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings): Llama 3.1's
# and Llama 3.2's standard values, the ones a GGUF rope_freqs tensor is matched against
LLAMA31_ROPE = (8.0, 1.0, 4.0, 8192)
LLAMA32_ROPE = (32.0, 1.0, 4.0, 8192)
# Llama 3 specs run on longer sequences: the scaled frequencies are the slow ones (wavelengths over 2048), so
# they move the logits only over long relative distances (plain rotary: 1e-3 off HF at 13 tokens, 1.5e-2 at 256)
LLAMA3_SEQ_LEN = 256


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
    rope: tuple[float, float, float, int] | None = None  # Llama 3 scaling, see LLAMA31_ROPE
    tied: bool = False                                  # tie_word_embeddings


SPECS = [
    # GQA, nothing a power of two, non-default eps and theta
    TinySpec("gqa_odd", hidden=48, heads=6, kv_heads=2, intermediate=100, vocab=97, eps=1e-6, theta=5000.0),
    # MHA, 5 heads of 8
    TinySpec("mha_odd", hidden=40, heads=5, kv_heads=5, intermediate=72, vocab=61, attn="sdpa"),
    # MQA (one KV head), three layers
    TinySpec("mqa", hidden=32, heads=4, kv_heads=1, intermediate=88, vocab=50, layers=3, attn="sdpa"),
    # Llama 3.1-style rotary scaling (head_dim 16, theta 5e5: 1 frequency in the smooth band, 3 scaled down)
    TinySpec("llama3", hidden=64, heads=4, kv_heads=2, intermediate=96, vocab=97, theta=500000.0,
             rope=LLAMA31_ROPE),
    # tied embeddings (SmolLM2-style: plain rotary)
    TinySpec("tied", hidden=48, heads=6, kv_heads=3, intermediate=128, vocab=89, theta=100000.0, tied=True,
             attn="sdpa"),
    # both at once (Llama 3.2 1B/3B-style: factor 32)
    TinySpec("llama3_tied", hidden=64, heads=4, kv_heads=1, intermediate=96, vocab=71, theta=500000.0,
             rope=LLAMA32_ROPE, tied=True),
]

# Meta's model-parallel split axis (fairscale ParallelEmbedding / Column- / RowParallelLinear), written
# here independently of model/forms.py so the loader's table is tested, not re-used.
_SPLIT = {"tok_embeddings": 1, "output": 0, "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "wo": 1, "w2": 1}


def make_hf_model(spec: TinySpec, seed: int = 0) -> LlamaForCausalLM:
    """fp32 LlamaForCausalLM with O(1)-scale random weights (HF's 0.02 init gives near-zero logits)
    and random norm weights, so a swapped norm or a wrong q/k permutation changes the logits.
    A tied embedding is also the output projection, so it gets the 1/sqrt(fan-in) scale of a linear."""
    rope = {"rope_type": "default", "rope_theta": spec.theta}
    if spec.rope is not None:
        factor, low, high, original = spec.rope
        rope.update(rope_type="llama3", factor=factor, low_freq_factor=low, high_freq_factor=high,
                    original_max_position_embeddings=original)
    cfg = LlamaConfig(hidden_size=spec.hidden, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
                      intermediate_size=spec.intermediate, vocab_size=spec.vocab, num_hidden_layers=spec.layers,
                      max_position_embeddings=64 if spec.rope is None else 16384, rms_norm_eps=spec.eps,
                      rope_parameters=rope, tie_word_embeddings=spec.tied, attn_implementation=spec.attn)
    model = LlamaForCausalLM(cfg).float().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name and not spec.tied:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
    return model


def save_hf(model: LlamaForCausalLM, path: Path, max_shard_size: str = "8KB") -> Path:
    """Form 3, forced into several shards plus model.safetensors.index.json."""
    model.save_pretrained(path, safe_serialization=True, max_shard_size=max_shard_size)
    assert len(list(path.glob("model-*.safetensors"))) >= 3, "expected several HF shards"
    return path


def hf_rope_scaling_copy(hf: Path, dst: Path) -> Path:
    """The HF checkpoint at hf with config.json in transformers 4's spelling: rope_scaling + top-level rope_theta."""
    shutil.copytree(hf, dst)
    cfg = json.loads((dst / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    assert rope["rope_type"] == "llama3", rope
    cfg["rope_scaling"] = rope
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def meta_state_dict(model: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    """HF weights renamed to Meta keys, wq/wk rows back in Meta's interleaved rotary order (tied: no output)."""
    cfg = model.config
    out = {}
    for k, v in model.state_dict().items():
        mk = hf_to_meta_key(k)
        if mk is None or (mk == "output.weight" and cfg.tie_word_embeddings):
            continue
        heads = qk_heads(mk, cfg.num_attention_heads, cfg.num_key_value_heads)
        out[mk] = (v if heads is None else permute_to_meta(v, heads)).detach().clone()
    return out


def meta_style_params(spec: TinySpec) -> dict:
    """params.json as Meta writes it: multiple_of/ffn_dim_multiplier for the FFN size, vocab_size -1; Llama 3:
    use_scaled_rope, with rope_scaling_factor only when it is not Meta's default 8 (Llama 3.2's 32). Tied: no
    key at all (the checkpoint simply has no output.weight)."""
    base = int(2 * 4 * spec.hidden / 3)
    multiplier = spec.intermediate / base
    multiple_of = 4 if spec.intermediate % 4 == 0 else 1
    assert meta_hidden_dim(spec.hidden, multiple_of, multiplier) == spec.intermediate, spec
    params = {"dim": spec.hidden, "n_layers": spec.layers, "n_heads": spec.heads, "n_kv_heads": spec.kv_heads,
              "vocab_size": -1, "multiple_of": multiple_of, "ffn_dim_multiplier": multiplier,
              "norm_eps": spec.eps, "rope_theta": spec.theta}
    if spec.rope is not None:
        assert spec.rope[1:] == (1.0, 4.0, 8192), "Meta's params.json has no keys for non-standard values"
        params["use_scaled_rope"] = True
        if spec.rope[0] != 8.0:
            params["rope_scaling_factor"] = spec.rope[0]
    return params


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


def gguf_rope_factors(spec: TinySpec):
    """rope_freqs.weight for a Llama 3 spec (None for plain rotary)."""
    if spec.rope is None:
        return None
    return llama3_rope_factors(spec.hidden // spec.heads, spec.theta, *spec.rope)


def build_forms(spec: TinySpec, root: Path, seed: int = 0) -> tuple[LlamaForCausalLM, dict[str, Path]]:
    """The HF model and its forms: hf (form 3, sharded), hf_rope_scaling (Llama 3 specs: form 3 with
    transformers 4's config spelling), meta_st (form 1, via engine/convert.py), meta_pth (form 2, two
    model-parallel shards, Meta-style params.json with vocab_size -1) and gguf (form 4, all F32; when the gguf
    package is installed)."""
    model = make_hf_model(spec, seed)
    hf = save_hf(model, root / "hf")
    (hf / "tokenizer.model").write_bytes(b"not a real sentencepiece model")  # convert copies it
    forms = {"hf": hf}
    if spec.rope is not None:
        forms["hf_rope_scaling"] = hf_rope_scaling_copy(hf, root / "hf_rope_scaling")
    assert convert_main([str(hf), str(root / "meta_st"), "--max-shard-size", "10KB"]) == 0
    forms["meta_st"] = root / "meta_st"
    forms["meta_pth"] = write_meta_pth(meta_state_dict(model), meta_style_params(spec), root / "meta_pth")
    if importlib.util.find_spec("gguf") is not None:  # the formats extra
        forms["gguf"] = write_gguf(model, root / "gguf" / "tiny.gguf", rope_factors=gguf_rope_factors(spec))
    return model, forms


def tokens_for(spec: TinySpec, batch: int = 2, length: int | None = None, seed: int = 1) -> torch.Tensor:
    """(batch, length) random ids; length defaults to 13, LLAMA3_SEQ_LEN for Llama 3 specs."""
    length = length or (13 if spec.rope is None else LLAMA3_SEQ_LEN)
    return torch.randint(0, spec.vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


# bitsandbytes 4-bit (`*-bnb-4bit`): the linears transformers' bnb quantizer replaces by Linear4bit (every nn.Linear
# but the output head, by default)
BNB_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def bnb_quantization_config(**overrides) -> dict:
    """config.json's quantization_config as transformers 5.25 + bitsandbytes 0.50.2 wrote it for
    BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
    bnb_4bit_compute_dtype=torch.bfloat16) (a real save_pretrained, compared key for key)."""
    qc = {"_load_in_4bit": True, "_load_in_8bit": False, "bnb_4bit_compute_dtype": "bfloat16",
          "bnb_4bit_quant_storage": "uint8", "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
          "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False,
          "llm_int8_skip_modules": None, "llm_int8_threshold": 6.0, "load_in_4bit": True, "load_in_8bit": False,
          "quant_method": "bitsandbytes"}
    qc.update(overrides)
    return qc


def bnb_4bit_tensors(name: str, w: torch.Tensor, dtype: str = "float32") -> dict[str, torch.Tensor]:
    """One Linear4bit weight as transformers saves it (bitsandbytes QuantState.as_dict(packed=True) under
    `<name>.`): quantized with reference_nf4.quantize_nf4 (bitsandbytes' layout; the same bytes as bitsandbytes'
    CPU quantizer up to its documented nested-absmax ties). `dtype`: the quant_state's original dtype string."""
    from llama_erc.kernels.reference_nf4 import NF4_CODE, quantize_nf4
    q = quantize_nf4(w)
    state = {"quant_type": "nf4", "blocksize": 64, "dtype": dtype, "shape": list(w.shape), "nested_blocksize": 256,
             "nested_dtype": "float32", "nested_offset": q.offset}  # bitsandbytes' key order; json.dumps defaults
    return {name: q.packed.view(-1, 1).clone(), f"{name}.absmax": q.absmax_codes.clone(),
            f"{name}.nested_absmax": q.nested_absmax.clone(), f"{name}.nested_quant_map": q.nested_code.clone(),
            f"{name}.quant_map": NF4_CODE.clone(),
            f"{name}.quant_state.bitsandbytes__nf4": torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)}


def save_bnb_4bit(model: LlamaForCausalLM, path: Path, skip: tuple[str, ...] = (), n_shards: int = 1,
                  dtype: str = "float32", **qc_overrides) -> dict[str, torch.Tensor]:
    """A `*-bnb-4bit` checkpoint of `model` at path: config.json with quantization_config, the block linears as
    bitsandbytes NF4 tensors (bnb_4bit_tensors' keys), everything else (embedding, norms, lm_head, and the modules in
    `skip`, e.g. "model.layers.1.mlp.down_proj", listed as llm_int8_skip_modules) dense. n_shards > 1 writes
    model-0000i-of-0000n.safetensors + model.safetensors.index.json. Returns the HF state dict the file
    dequantizes to (reference_nf4.dequantize_nf4 of each quantized weight, fp32), for a dense reference model."""
    from safetensors.torch import save_file
    from llama_erc.kernels.reference_nf4 import NF4Weight, dequantize_nf4
    path.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = bnb_quantization_config(
        llm_int8_skip_modules=["lm_head", *skip] if skip else None, **qc_overrides)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    tensors, deq = {}, {}
    for k, v in model.state_dict().items():
        if model.config.tie_word_embeddings and k == "lm_head.weight":
            continue
        module = k.removesuffix(".weight")
        if k.endswith(".weight") and module.split(".")[-1] in BNB_LINEARS and module not in skip:
            t = bnb_4bit_tensors(k, v, dtype)
            tensors.update(t)
            st = json.loads(bytes(t[f"{k}.quant_state.bitsandbytes__nf4"].tolist()))
            deq[k] = dequantize_nf4(NF4Weight(t[k].view(-1), t[f"{k}.absmax"], t[f"{k}.nested_absmax"],
                                              t[f"{k}.nested_quant_map"], st["nested_offset"], tuple(st["shape"])))
        else:
            tensors[k] = v.detach().clone().contiguous()
            deq[k] = tensors[k]
    names = sorted(tensors)
    if n_shards == 1:
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for i in range(n_shards):
            fname = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
            part = {k: tensors[k] for k in names[i::n_shards]}
            save_file(part, path / fname, metadata={"format": "pt"})
            weight_map.update({k: fname for k in part})
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return deq
