"""Parity with Hugging Face transformers + PEFT: same tiny base, same LoRA init -> same loss, LoRA grads and
AdamW trajectory; export_peft loads in PeftModel.from_pretrained and gives our logits; import_peft reads PEFT.

The HF <-> Meta conversion here is written out from model/hf_keys.py (not model/forms.py), so these tests
depend only on the key table and the rotary row permutation.
"""
import copy
import json

import pytest
import torch
import torch.nn.functional as F

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from llama_erc.model.config import from_hf_config  # noqa: E402
from llama_erc.model.hf_keys import LINEAR_META_TO_HF, hf_to_meta_key, permute_to_hf, permute_to_meta, qk_heads  # noqa: E402
from llama_erc.model.llama import Transformer  # noqa: E402
from llama_erc.model.lora import LoRAConfig, apply_lora, lora_state_dict  # noqa: E402
from llama_erc.model.peft import export_peft, import_peft  # noqa: E402
from tests.tolerances import TOL, assert_close, max_rel_err  # noqa: E402

ALL = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
RANK, ALPHA = 4, 8
GRAD_RTOL = 1e-5  # fp32; max |ours - peft| / max |peft| per tensor
# transformers 5.23 warns from inside PEFT's own get_peft_model; nothing of ours
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


def _hf_base(n_kv_heads: int) -> transformers.LlamaForCausalLM:
    """Tiny random LLaMA with non-power-of-two sizes; weights scaled up so attention is far from uniform."""
    torch.manual_seed(0)
    hc = transformers.LlamaConfig(hidden_size=48, num_attention_heads=6, num_key_value_heads=n_kv_heads,
                                  intermediate_size=100, vocab_size=97, num_hidden_layers=2,
                                  max_position_embeddings=64, rms_norm_eps=1e-5, attn_implementation="eager")
    hf = transformers.LlamaForCausalLM(hc).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.2 * torch.randn_like(p))
    return hf


def _ours_from_hf(hf) -> Transformer:
    cfg = from_hf_config(hf.config.to_dict())
    sd = {}
    for k, v in hf.state_dict().items():
        mk = hf_to_meta_key(k)
        if mk is not None:
            heads = qk_heads(mk, cfg.n_heads, cfg.n_kv_heads)
            sd[mk] = permute_to_meta(v, heads) if heads else v.clone()
    model = Transformer(cfg).eval()
    model.load_state_dict(sd, strict=True)
    return model


def _peft_name(meta_key: str) -> str:
    """'layers.1.attention.wk.lora_b' -> the PeftModel parameter of the default adapter."""
    _, i, _, lin, ab = meta_key.split(".")
    return f"base_model.model.model.layers.{i}.{LINEAR_META_TO_HF[lin]}.lora_{ab[-1].upper()}.default.weight"


def _to_hf_layout(meta_key: str, t: torch.Tensor, cfg) -> torch.Tensor:
    """B's rows of wq/wk follow the rotary row order; everything else is layout-free."""
    heads = qk_heads(meta_key.replace(".lora_b", ".weight"), cfg.n_heads, cfg.n_kv_heads)
    return permute_to_hf(t, heads) if heads else t


def _setup(n_kv_heads: int, targets: tuple[str, ...]):
    """(ours, peft model, cfg): same base, same non-zero random adapters (A and B) on both sides."""
    hf = _hf_base(n_kv_heads)
    ours = apply_lora(_ours_from_hf(hf), LoRAConfig(RANK, ALPHA, 0.0, targets), verbose=False)
    hf_targets = [LINEAR_META_TO_HF[t].split(".")[1] for t in targets]
    pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                                                 target_modules=hf_targets))
    g = torch.Generator().manual_seed(1)
    peft_params = dict(pm.named_parameters())
    with torch.no_grad():
        for k, p in lora_state_dict(ours).items():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
            peft_params[_peft_name(k)].copy_(_to_hf_layout(k, p, ours.config))
    assert {n for n, p in pm.named_parameters() if p.requires_grad} == {_peft_name(k) for k in lora_state_dict(ours)}
    return ours, pm, ours.config


def _batch():
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 97, (2, 11), generator=g)
    labels = tokens.clone()
    labels[0, :4] = -100  # prompt positions
    labels[1, :6] = -100
    labels[1, 9] = -100
    return tokens, labels


def _our_loss(model, tokens, labels):
    """Sum of next-token CE over supervised positions / their count (the engine's loss, written out)."""
    logits = model(tokens)[:, :-1].float()  # (B, T-1, V)
    target = labels[:, 1:]  # (B, T-1)
    n = (target != -100).sum()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100,
                           reduction="sum") / n


def _assert_adapters_match(ours, pm, cfg, what: str, rtol: float) -> None:
    peft_params = dict(pm.named_parameters())
    for k, p in ours.named_parameters():
        if not k.endswith((".lora_a", ".lora_b")):
            continue
        mine = _to_hf_layout(k, p.grad if what == "grad" else p.detach(), cfg)
        ref = peft_params[_peft_name(k)]
        ref = ref.grad if what == "grad" else ref.detach()
        err = max_rel_err(mine, ref)
        assert err <= rtol, f"{what} of {k}: max rel err {err:.2e} > {rtol:.0e}"


@pytest.mark.parametrize("targets", [("wq", "wv"), ALL], ids=["qv", "all7"])
@pytest.mark.parametrize("n_kv_heads", [6, 2], ids=["mha", "gqa"])
def test_lora_peft_parity_loss_grads_and_adamw(n_kv_heads, targets):
    ours, pm, cfg = _setup(n_kv_heads, targets)
    tokens, labels = _batch()

    loss = _our_loss(ours, tokens, labels)
    ref = pm(input_ids=tokens, labels=labels).loss
    assert_close(loss, ref, TOL["row"][torch.float32])
    loss.backward()
    ref.backward()
    _assert_adapters_match(ours, pm, cfg, "grad", GRAD_RTOL)

    # Adam divides by sqrt(v): an element whose grad is near fp32 noise gets an O(lr) step in a random
    # direction, on either side (at lr=1e-2 one such element reached 6e-4 relative in a trial). lr=1e-3 keeps
    # that below the tolerance, while 3 steps still move each adapter by ~0.4% of its max (checked below),
    # so a wrong gradient would show as an O(lr) difference, ~100x the tolerance.
    before = {k: p.detach().clone() for k, p in lora_state_dict(ours).items()}
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.01)
            for m in (ours, pm)]
    for _ in range(3):
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        _our_loss(ours, tokens, labels).backward()
        pm(input_ids=tokens, labels=labels).loss.backward()
        for opt in opts:
            opt.step()
    _assert_adapters_match(ours, pm, cfg, "value", GRAD_RTOL)
    for k, p in lora_state_dict(ours).items():
        assert max_rel_err(p, before[k]) > 1e-3, f"{k} did not move"
    assert_close(_our_loss(ours, tokens, labels), pm(input_ids=tokens, labels=labels).loss,
                 TOL["row"][torch.float32])


def test_lora_export_peft_loads_and_matches_logits(tmp_path):
    hf = _hf_base(n_kv_heads=2)  # GQA: wk's B is permuted by n_kv_heads, wq's by n_heads
    ours = apply_lora(_ours_from_hf(hf), LoRAConfig(RANK, ALPHA, 0.05, ALL), verbose=False).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in lora_state_dict(ours).values():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    export_peft(ours, tmp_path / "adapter", "meta-llama/Llama-2-7b-hf")

    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert written["base_model_name_or_path"] == "meta-llama/Llama-2-7b-hf"
    assert set(written["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj",
                                              "up_proj"}
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "adapter").eval()
    assert pm.peft_config["default"].r == RANK and pm.peft_config["default"].lora_alpha == ALPHA

    tokens, _ = _batch()
    with torch.no_grad():
        mine, ref = ours(tokens), pm(input_ids=tokens).logits
        base = hf(input_ids=tokens).logits
    assert max_rel_err(base, ref) > 1e-2  # the adapter really changes the output
    assert max_rel_err(mine, ref) <= 1e-4
    assert_close(mine, ref, TOL["logits"][torch.float32])


def test_lora_export_matches_peft_save_format_and_import_reads_it(tmp_path):
    """Our export has exactly PEFT's own keys and shapes; import_peft reads PEFT's own save_pretrained."""
    ours, pm, cfg = _setup(n_kv_heads=2, targets=("wq", "wk", "wv", "w2"))
    export_peft(ours, tmp_path / "ours", "tiny")
    pm.save_pretrained(tmp_path / "peft")
    from safetensors.torch import load_file
    a = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    b = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k  # same adapters, same layout, bit for bit
    ca = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    cb = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    for f in ("peft_type", "r", "lora_alpha", "lora_dropout", "bias", "use_rslora", "use_dora", "fan_in_fan_out"):
        assert ca[f] == cb[f], f
    assert set(ca["target_modules"]) == set(cb["target_modules"])

    fresh = _ours_from_hf(_hf_base(n_kv_heads=2))
    import_peft(fresh, tmp_path / "peft")
    for k, v in lora_state_dict(ours).items():
        assert torch.equal(lora_state_dict(fresh)[k], v), k
    tokens, _ = _batch()
    with torch.no_grad():
        assert_close(fresh(tokens), pm(input_ids=tokens).logits, TOL["logits"][torch.float32])


def test_lora_import_peft_rejects_unsupported(tmp_path):
    ours, _, _ = _setup(n_kv_heads=2, targets=("wq", "wv"))
    export_peft(ours, tmp_path, "tiny")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg | {"use_dora": True}))
    with pytest.raises(ValueError, match="unsupported PEFT adapter settings.*use_dora"):
        import_peft(_ours_from_hf(_hf_base(2)), tmp_path)
