"""LoRA layer, apply/merge, adapter save/load and the meta-device build paths (tiny model, CPU, fp32)."""
import json

import pytest
import torch
from safetensors.torch import save_file

from llama_erc.model.config import MODEL_PRESETS, ModelConfig
from llama_erc.model.llama import Transformer
from llama_erc.model.lora import (LoRAConfig, LoRALinear, apply_lora, load_adapters, lora_config_of, lora_state_dict,
                                  merge_lora, n_lora_params, reset_lora_parameters, save_adapters, unmerge_lora)
from tests.tolerances import TOL, assert_close

CFG = ModelConfig(dim=48, n_layers=2, n_heads=6, n_kv_heads=2, hidden_dim=100, vocab_size=97, max_seq_len=64)
ALL = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


def _base(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(CFG).eval()


def _randomise_adapters(model, seed: int = 1) -> None:
    """Non-zero B so that the adapter path actually changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, p in lora_state_dict(model).items():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))


def _tokens(seed: int = 2) -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (2, 9), generator=torch.Generator().manual_seed(seed))


def test_lora_config_validates():
    assert LoRAConfig().targets == ("wq", "wv") and LoRAConfig().scale == 2.0
    assert LoRAConfig(targets=["wq", "w2"]).targets == ("wq", "w2")
    with pytest.raises(ValueError, match="rank"):
        LoRAConfig(rank=0)
    with pytest.raises(ValueError, match="valid targets: wq, wk, wv, wo, w1, w2, w3"):
        LoRAConfig(targets=("wq", "q_proj"))
    for bad in ((), ("wq", "wq")):
        with pytest.raises(ValueError, match="valid targets"):
            LoRAConfig(targets=bad)
    with pytest.raises(ValueError, match="dropout"):
        LoRAConfig(dropout=1.0)


def test_lora_layer_init_like_peft_and_shares_weight():
    torch.manual_seed(0)
    lin = torch.nn.Linear(40, 24, bias=False)
    layer = LoRALinear(lin.weight, LoRAConfig(rank=4, alpha=8, dropout=0.0))
    assert layer.weight.data_ptr() == lin.weight.data_ptr()  # composition: the tensor is handed over
    assert layer.lora_a.shape == (4, 40) and layer.lora_b.shape == (24, 4)
    assert layer.lora_a.dtype == layer.lora_b.dtype == torch.float32
    assert torch.count_nonzero(layer.lora_b) == 0 and layer.lora_a.abs().max() <= 1 / 40 ** 0.5  # kaiming a=sqrt(5)
    assert list(dict(layer.state_dict()).keys()) == ["weight", "lora_a", "lora_b"]


def test_lora_at_init_equals_base_model():
    model = _base()
    tokens = _tokens()
    ref = model(tokens)
    apply_lora(model, LoRAConfig(targets=ALL), verbose=False)
    model.train()  # dropout active on the adapter input: still exact, since B == 0
    assert torch.equal(model(tokens), ref)


def test_lora_only_adapters_require_grad_and_count(capsys):
    model = apply_lora(_base(), LoRAConfig(rank=4, targets=("wq", "wk", "w2")))
    assert "trainable" in capsys.readouterr().out
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_state_dict(model)) and trainable
    assert all(k.endswith((".lora_a", ".lora_b")) for k in trainable)
    assert sum(model.get_parameter(k).numel() for k in trainable) == n_lora_params(CFG, LoRAConfig(
        rank=4, targets=("wq", "wk", "w2")))
    model(_tokens()).float().pow(2).mean().backward()
    for k, p in model.named_parameters():
        assert (p.grad is not None) == (k in trainable), k


def test_lora_param_count_7b():
    """The numbers in model/lora.py's docstring."""
    cfg7b = MODEL_PRESETS["llama-2-7b"]
    assert n_lora_params(cfg7b, LoRAConfig(rank=8, targets=("wq", "wv"))) == 4_194_304
    assert n_lora_params(cfg7b, LoRAConfig(rank=4, targets=("wq", "wv"))) == 2_097_152
    assert n_lora_params(cfg7b, LoRAConfig(rank=8, targets=("wq",))) == 2_097_152
    assert n_lora_params(cfg7b, LoRAConfig(rank=2, targets=("wq", "wk", "wv", "wo"))) == 2_097_152


def test_lora_merged_equals_unmerged():
    model = apply_lora(_base(), LoRAConfig(targets=ALL), verbose=False).eval()
    _randomise_adapters(model)
    tokens = _tokens()
    w0 = model.layers[0].attention.wq.weight.clone()
    ref = model(tokens)
    assert not torch.allclose(ref, _base()(tokens), atol=1e-3)  # adapters matter
    merge_lora(model)
    assert_close(model(tokens), ref, TOL["logits"][torch.float32])
    with pytest.raises(RuntimeError, match="already merged"):
        merge_lora(model)
    unmerge_lora(model)
    assert_close(model.layers[0].attention.wq.weight, w0, TOL["elementwise"][torch.float32])
    assert_close(model(tokens), ref, TOL["logits"][torch.float32])


def test_lora_unmerge_bf16_rounding_caveat():
    torch.manual_seed(0)
    w = torch.randn(64, 32).to(torch.bfloat16)
    layer = LoRALinear(w, LoRAConfig(rank=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        layer.lora_b.normal_()
    layer.merge(keep_original=True)
    assert list(layer.state_dict()) == ["weight", "lora_a", "lora_b"]  # the kept copy is not checkpointed
    layer.unmerge()
    assert torch.equal(layer.weight, w)  # exact restore when the original is kept
    layer.merge()
    assert layer.weight.dtype == torch.bfloat16
    layer.unmerge()  # subtraction: off by at most one bf16 ulp of |W| + |s BA|
    bound = 2.0 ** -7 * (w.float().abs() + layer.delta_weight().abs())
    assert ((layer.weight.float() - w.float()).abs() <= bound).all()


def test_lora_adapter_save_load_roundtrip(tmp_path):
    cfg = LoRAConfig(rank=4, alpha=8, targets=("wq", "wv", "w1"))
    model = apply_lora(_base(), cfg, verbose=False).eval()
    _randomise_adapters(model)
    save_adapters(model, tmp_path / "a.safetensors")
    other = apply_lora(_base(), cfg, verbose=False).eval()
    load_adapters(other, tmp_path / "a.safetensors")
    for k, v in lora_state_dict(model).items():
        assert torch.equal(lora_state_dict(other)[k], v)
    assert torch.equal(other(_tokens()), model(_tokens()))
    assert lora_config_of(other) == cfg


def test_lora_load_bad_adapter_file_errors(tmp_path):
    cfg = LoRAConfig(rank=4, alpha=8)
    model = apply_lora(_base(), cfg, verbose=False)
    sd = {k: v.clone() for k, v in lora_state_dict(model).items()}
    sd.pop("layers.1.attention.wv.lora_a")
    sd["layers.0.attention.wq.lora_b"] = torch.zeros(CFG.dim, 5)
    sd["layers.9.attention.wq.lora_a"] = torch.zeros(4, CFG.dim)
    save_file(sd, tmp_path / "bad.safetensors")  # no metadata: the key/shape check must catch it all
    with pytest.raises(ValueError) as e:
        load_adapters(model, tmp_path / "bad.safetensors")
    msg = str(e.value)
    assert "missing keys ['layers.1.attention.wv.lora_a']" in msg
    assert "unexpected keys ['layers.9.attention.wq.lora_a']" in msg
    assert "layers.0.attention.wq.lora_b: file (48, 5) vs model (48, 4)" in msg

    save_adapters(apply_lora(_base(), LoRAConfig(rank=4, alpha=32), verbose=False), tmp_path / "alpha.st")
    with pytest.raises(ValueError, match="saved with LoRAConfig"):
        load_adapters(model, tmp_path / "alpha.st")  # same shapes, different scale: must not load silently

    save_file(sd, tmp_path / "meta.st", metadata={"lora_config": "{not json"})
    with pytest.raises(ValueError, match="unreadable LoRA config"):
        load_adapters(model, tmp_path / "meta.st")

    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="junk.safetensors: not a readable safetensors"):
        load_adapters(model, tmp_path / "junk.safetensors")


def test_lora_apply_errors():
    model = apply_lora(_base(), LoRAConfig(), verbose=False)
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, LoRAConfig())
    with pytest.raises(ValueError, match="no LoRA layers"):
        lora_config_of(_base())


def test_lora_meta_build_then_assign_then_apply():
    """Engine path: build on meta, load the base with assign=True, then apply LoRA on real weights."""
    base = _base()
    with torch.device("meta"):
        model = Transformer(CFG)
    model.load_state_dict(base.state_dict(), assign=True)
    apply_lora(model, LoRAConfig(targets=ALL), verbose=False)
    assert not any(p.is_meta for p in model.parameters())
    assert model.layers[0].attention.wq.lora_a.abs().sum() > 0
    assert torch.equal(model.eval()(_tokens()), base(_tokens()))


@pytest.mark.parametrize("materialise", ["to_empty", "assign"])
def test_lora_meta_apply_then_materialise_then_reset(materialise):
    """apply_lora on a meta model; then either to_empty + load, or assign-load the base (adapters stay meta)."""
    base = _base()
    with torch.device("meta"):
        model = Transformer(CFG)
    apply_lora(model, LoRAConfig(targets=ALL), verbose=False)
    if materialise == "to_empty":
        model.to_empty(device="cpu")
        result = model.load_state_dict(base.state_dict(), strict=False)
    else:
        result = model.load_state_dict(base.state_dict(), strict=False, assign=True)
    assert not result.unexpected_keys and set(result.missing_keys) == set(lora_state_dict(model))
    reset_lora_parameters(model)
    assert not any(p.is_meta for p in model.parameters())
    assert {k for k, p in model.named_parameters() if p.requires_grad} == set(lora_state_dict(model))
    assert torch.equal(model.eval()(_tokens()), base(_tokens()))
    assert all(torch.count_nonzero(p) == 0 for k, p in lora_state_dict(model).items() if k.endswith("lora_b"))


def test_lora_bf16_base_keeps_fp32_adapters():
    model = _base().to(torch.bfloat16)
    apply_lora(model, LoRAConfig(), verbose=False)
    _randomise_adapters(model)
    layer = model.layers[0].attention.wq
    assert layer.weight.dtype == torch.bfloat16 and layer.lora_a.dtype == torch.float32
    out = model(_tokens())
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert layer.lora_a.grad.dtype == torch.float32 and layer.lora_b.grad.dtype == torch.float32
    json.dumps(lora_config_of(model).__dict__)  # config stays JSON-serialisable for checkpoints


def test_apply_lora_accepts_fields_or_config():
    from llama_erc.model import Transformer, preset
    from llama_erc.model.lora import LoRAConfig, apply_lora, lora_config_of

    a = apply_lora(Transformer(preset("tiny")), rank=4, alpha=8, dropout=0.0, targets=("wq", "w2"), verbose=False)
    assert lora_config_of(a) == LoRAConfig(rank=4, alpha=8, dropout=0.0, targets=("wq", "w2"))
    with pytest.raises(ValueError, match="not both"):
        apply_lora(Transformer(preset("tiny")), LoRAConfig(), rank=4)
