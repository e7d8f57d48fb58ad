"""Llama 3 rotary scaling and tied embeddings beyond loading: config refusals (the error names key and value),
tied weights staying one tensor through engine/convert.py, LoRA, merge and PEFT export/import, and the Triton
kernels path on a Llama-3-scaled tied model.
"""
import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from llama_erc.kernels import select_ops
from llama_erc.model.load import LoadError, load_pretrained
from llama_erc.model.config import ModelConfig, from_hf_config, from_meta_params, to_meta_params
from llama_erc.model.llama import Transformer
from llama_erc.model.lora import LoRAConfig, apply_lora, lora_state_dict, merge_lora
from tests.tolerances import TOL, assert_close, max_rel_err

BASE_HF = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96,
           "vocab_size": 97, "num_hidden_layers": 2}


# --- refusals ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rope_type", ["linear", "dynamic", "yarn", "longrope"])
@pytest.mark.parametrize("key", ["rope_scaling", "rope_parameters"])
def test_hf_config_refuses_other_rope_types(key, rope_type):
    cfg = {**BASE_HF, key: {"rope_type": rope_type, "factor": 2.0, "rope_theta": 10000.0}}
    with pytest.raises(ValueError, match=rf"config.json: {key}.rope_type '{rope_type}' is unsupported"):
        from_hf_config(cfg)


def test_hf_config_refuses_old_type_spelling():
    with pytest.raises(ValueError, match="rope_scaling.rope_type 'linear' is unsupported"):
        from_hf_config({**BASE_HF, "rope_scaling": {"type": "linear", "factor": 2.0}})


@pytest.mark.parametrize("key,value,match", [
    ("attention_bias", True, "attention_bias=True is unsupported"),
    ("mlp_bias", True, "mlp_bias=True is unsupported"),
    ("head_dim", 32, r"head_dim 32 != hidden_size / num_attention_heads \(16\)"),
    ("hidden_act", "gelu", "hidden_act 'gelu' is unsupported"),
])
def test_hf_config_refuses_non_llama(key, value, match):
    with pytest.raises(ValueError, match=match):
        from_hf_config({**BASE_HF, key: value})
    from_hf_config({**BASE_HF, key: {"attention_bias": False, "mlp_bias": False, "head_dim": 16,
                                     "hidden_act": "silu"}[key]})  # the LLaMA value passes


def test_hf_config_llama3_missing_field_named():
    with pytest.raises(ValueError, match="rope_parameters \\(llama3\\) is missing 'low_freq_factor'"):
        from_hf_config({**BASE_HF, "rope_parameters": {"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0,
                                                       "original_max_position_embeddings": 8192}})


def test_load_pretrained_refusal_names_config_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**BASE_HF, "rope_scaling": {"rope_type": "yarn",
                                                                                  "factor": 4.0}}))
    save_file({"model.embed_tokens.weight": torch.zeros(97, 64)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(LoadError, match=r"config.json: rope_scaling.rope_type 'yarn' is unsupported"):
        load_pretrained(tmp_path)


def test_meta_params_round_trip_llama3_tied():
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=1, hidden_dim=96, vocab_size=71,
                      rope_theta=500000.0, rope_type="llama3", rope_factor=32.0, tie_embeddings=True)
    assert from_meta_params(to_meta_params(cfg)) == cfg
    meta = {"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 71, "use_scaled_rope": True}  # Meta's 3.1 file
    got = from_meta_params(meta, has_output=False)
    assert (got.rope_type, got.rope_factor, got.tie_embeddings) == ("llama3", 8.0, True)


# --- tied embeddings: one tensor -----------------------------------------------------------------------------

ALL = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """A tied, Llama-3.2-scaled HF model, its HF checkpoint (with tokenizer side files), form 1 of it (via
    engine/convert.py) and a batch of tokens."""
    pytest.importorskip("transformers")
    from llama_erc.engine.convert import main as convert_main
    from tests.model.helpers_hf import LLAMA32_ROPE, TinySpec, make_hf_model, save_hf, tokens_for
    spec = TinySpec("llama3_tied", hidden=64, heads=4, kv_heads=2, intermediate=96, vocab=71, theta=500000.0,
                    rope=LLAMA32_ROPE, tied=True)
    root = tmp_path_factory.mktemp("tied")
    hf = make_hf_model(spec)
    src = save_hf(hf, root / "hf")
    for name, text in (("tokenizer.json", "{}"), ("tokenizer_config.json", '{"eos_token": "x"}'),
                       ("chat_template.jinja", "{{ messages }}"), ("tokenizer.model", "spm")):
        (src / name).write_text(text)
    assert convert_main([str(src), str(root / "meta_st")]) == 0
    return hf, src, root / "meta_st", tokens_for(spec, length=17)


def test_convert_tied_writes_the_embedding_once(tied):
    _, src, dst, _ = tied
    with safe_open(str(dst / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert "tok_embeddings.weight" in keys and "output.weight" not in keys
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == keys
    params = json.loads((dst / "params.json").read_text())
    assert params["tie_embeddings"] is True and params["use_scaled_rope"] is True
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "tokenizer.model"):
        assert (dst / name).read_bytes() == (src / name).read_bytes(), name
    model = load_pretrained(dst, dtype=torch.float32)
    assert model.output.weight is model.tok_embeddings.weight
    assert sum(p.numel() for p in model.parameters()) == model.config.n_params


def test_lora_and_merge_on_tied_model(tied):
    _, _, dst, tokens = tied
    model = apply_lora(load_pretrained(dst, dtype=torch.float32), LoRAConfig(4, 8, 0.0, ALL), verbose=False).eval()
    assert model.output.weight is model.tok_embeddings.weight
    assert [n for n, p in model.named_parameters() if p.requires_grad] == list(lora_state_dict(model))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in lora_state_dict(model).values():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    with torch.no_grad():
        adapted = model(tokens)
        merge_lora(model)
        merged = model(tokens)
    assert model.output.weight is model.tok_embeddings.weight
    assert_close(merged, adapted, TOL["logits"][torch.float32])


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # transformers, inside PEFT
def test_peft_round_trip_on_tied_model(tied, tmp_path):
    peft = pytest.importorskip("peft")
    from llama_erc.model.peft import export_peft, import_peft
    hf, _, dst, tokens = tied
    ours = apply_lora(load_pretrained(dst, dtype=torch.float32), LoRAConfig(4, 8, 0.0, ALL), verbose=False).eval()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in lora_state_dict(ours).values():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    export_peft(ours, tmp_path / "adapter", "tiny-tied")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "adapter").eval()
    with torch.no_grad():
        mine, ref, base = ours(tokens), pm(input_ids=tokens).logits, hf(input_ids=tokens).logits
    assert max_rel_err(base, ref) > 1e-2  # the adapter really changes the output
    assert max_rel_err(mine, ref) <= 1e-4
    again = import_peft(load_pretrained(dst, dtype=torch.float32), tmp_path / "adapter", dropout=0.0).eval()
    assert again.output.weight is again.tok_embeddings.weight
    with torch.no_grad():
        assert torch.equal(again(tokens), mine)


def test_kernels_on_llama3_tied_model(tied):
    """The Triton op set (interpreted on CPU) gives the reference path's logits on a scaled, tied model."""
    _, _, dst, tokens = tied
    ref = load_pretrained(dst, dtype=torch.float32)
    fast = load_pretrained(dst, dtype=torch.float32, ops=select_ops(triton=True))
    assert fast.ops.rms_norm is not ref.ops.rms_norm and fast.output.weight is fast.tok_embeddings.weight
    tokens = tokens[:1, :9]  # the interpreter is slow
    with torch.no_grad():
        assert_close(fast(tokens), ref(tokens), TOL["logits"][torch.float32])


def test_tied_model_built_fresh_is_tied():
    cfg = from_hf_config({**BASE_HF, "tie_word_embeddings": True})
    model = Transformer(cfg)
    assert model.output.weight is model.tok_embeddings.weight
    assert "output.weight" in model.state_dict()  # still addressable by name (LoRA, engine code)
    with torch.device("meta"):
        meta = Transformer(cfg)
    meta.to_empty(device="cpu")
    meta.tie_weights()
    assert meta.output.weight is meta.tok_embeddings.weight
