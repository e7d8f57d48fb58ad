"""llama.cpp LoRA adapter GGUF (model/llamacpp_lora.py): round trips, the metadata, names and GGUF dims llama.cpp's
convert_lora_to_gguf.py writes, llama.cpp's load-time checks and scale emulated on the file, q/k row order, errors.
"""
import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from llama_erc.model.config import ModelConfig  # noqa: E402
from llama_erc.model.llama import Transformer  # noqa: E402
from llama_erc.model.llamacpp_lora import export_llamacpp_lora, read_llamacpp_lora  # noqa: E402
from llama_erc.model.lora import LoRAConfig, apply_lora, lora_config_of, lora_state_dict, merge_lora  # noqa: E402
from llama_erc.model.peft import export_peft  # noqa: E402

CFG = ModelConfig(dim=48, n_layers=2, n_heads=6, n_kv_heads=2, hidden_dim=100, vocab_size=97, max_seq_len=64)
ORDER = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
CPP = {"wq": "attn_q", "wk": "attn_k", "wv": "attn_v", "wo": "attn_output", "w1": "ffn_gate", "w2": "ffn_down",
       "w3": "ffn_up"}
MODULE = {"wq": "attention", "wk": "attention", "wv": "attention", "wo": "attention", "w1": "feed_forward",
          "w2": "feed_forward", "w3": "feed_forward"}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = apply_lora(Transformer(CFG).eval(), LoRAConfig(rank=4, alpha=8.0, dropout=0.0, targets=ORDER), verbose=False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in lora_state_dict(m).values():  # non-zero B, so that the adapter changes the weights
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return m


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    return export_llamacpp_lora(lora_state_dict(model), lora_config_of(model),
                                tmp_path_factory.mktemp("cpp") / "adapter.gguf", base_name="tiny-llama")


def _fields(path):
    r = gguf.GGUFReader(str(path))
    return r, {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}


def test_round_trip_f32_exact(model, exported):
    tensors, alpha = read_llamacpp_lora(exported)
    ours = lora_state_dict(model)
    assert alpha == 8.0 and set(tensors) == set(ours)
    for k, v in ours.items():
        assert tensors[k].dtype == torch.float32 and torch.equal(tensors[k], v), k


@pytest.mark.parametrize("outtype,dtype", [("f16", torch.float16), ("bf16", torch.bfloat16)])
def test_round_trip_half_rounds_to_nearest(model, tmp_path, outtype, dtype):
    path = export_llamacpp_lora(lora_state_dict(model), lora_config_of(model), tmp_path / "a.gguf", outtype=outtype)
    assert {t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors} == {outtype.upper()}
    tensors, _ = read_llamacpp_lora(path)
    for k, v in lora_state_dict(model).items():
        # gguf's f16/bf16 rounding is round-to-nearest-even, as torch's cast: equal, i.e. within rounding
        assert torch.equal(tensors[k], v.to(dtype).float()), k


def test_metadata_as_llamacpp_reads_it(exported):
    r, kv = _fields(exported)
    assert kv["general.architecture"] == "llama"  # must equal the base model's arch
    assert kv["general.type"] == "adapter" and kv["adapter.type"] == "lora"
    assert r.fields["adapter.lora.alpha"].types == [gguf.GGUFValueType.FLOAT32]  # gguf_get_val_f32 asserts f32
    assert kv["adapter.lora.alpha"] == 8.0
    assert kv["general.quantization_version"] == gguf.GGML_QUANT_VERSION
    assert kv["general.base_model.count"] == 1 and kv["general.base_model.0.name"] == "tiny-llama"
    assert not [k for k in kv if k.startswith("llama.") or k == "general.file_type"]  # the converter writes neither


def test_tensor_names_order_and_gguf_dims(model, exported):
    """As convert_lora_to_gguf.py writes them: `<base>.lora_a` then `.lora_b`, torch (r, in) / (out, r), i.e. GGUF
    dims (ggml ne) [in, r] / [r, out]; and llama-adapter.cpp's shape checks against the base tensor's ne."""
    tensors = gguf.GGUFReader(str(exported)).tensors
    want = [f"blk.{i}.{CPP[lin]}.weight.lora_{ab}" for i in range(CFG.n_layers) for lin in ORDER for ab in "ab"]
    assert [t.name for t in tensors] == want
    params = dict(model.named_parameters())
    by_name = {t.name: t.shape.tolist() for t in tensors}
    for i in range(CFG.n_layers):
        for lin in ORDER:
            out_dim, in_dim = params[f"layers.{i}.{MODULE[lin]}.{lin}.weight"].shape
            base_ne = [in_dim, out_dim]  # the base GGUF's dims of W (torch (out, in))
            a_ne, b_ne = by_name[f"blk.{i}.{CPP[lin]}.weight.lora_a"], by_name[f"blk.{i}.{CPP[lin]}.weight.lora_b"]
            assert a_ne == [in_dim, 4] and b_ne == [4, out_dim]
            assert base_ne[0] == a_ne[0] and base_ne[1] == b_ne[1] and a_ne[1] == b_ne[0]  # llama-adapter.cpp


def test_llamacpp_scale_reproduces_our_merge(model, exported):
    """llama.cpp: W x + adapter_scale * alpha / rank * B (A x), rank = b->ne[0]; with --lora (scale 1) that must be
    our merged weight W + (alpha / r) B A."""
    r = gguf.GGUFReader(str(exported))
    alpha = float(r.fields["adapter.lora.alpha"].contents())
    cpp = {t.name: t for t in r.tensors}
    base = {k: v.clone() for k, v in model.state_dict().items() if k.endswith(".weight")}
    m2 = apply_lora(Transformer(CFG).eval(), lora_config_of(model), verbose=False)
    m2.load_state_dict(model.state_dict())  # a copy to merge: the module-scoped fixture stays unmerged
    merge_lora(m2)
    merged = m2.state_dict()
    for i in range(CFG.n_layers):
        for lin in ORDER:
            a, b = cpp[f"blk.{i}.{CPP[lin]}.weight.lora_a"], cpp[f"blk.{i}.{CPP[lin]}.weight.lora_b"]
            scale = 1.0 * alpha / int(b.shape[0])  # b->ne[0]
            a_t, b_t = torch.from_numpy(np.array(a.data)), torch.from_numpy(np.array(b.data))  # numpy = torch layout
            key = f"layers.{i}.{MODULE[lin]}.{lin}.weight"
            torch.testing.assert_close(base[key] + scale * (b_t @ a_t), merged[key], rtol=1e-6, atol=1e-6)


def test_qk_rows_need_no_permutation(model, exported, tmp_path):
    """The converter permutes a PEFT (HF rotate-half) adapter's q/k B rows with LlamaModel.permute into GGUF's order;
    applied to our PEFT export that gives exactly the B rows we write unpermuted."""
    from safetensors.torch import load_file

    def converter_permute(w, n_head):  # conversion/llama.py LlamaModel.permute, on B (A is left as it is)
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    export_peft(model, tmp_path, "tiny")
    peft = load_file(str(tmp_path / "adapter_model.safetensors"))
    ours, _ = read_llamacpp_lora(exported)
    for lin, proj, heads in (("wq", "q_proj", CFG.n_heads), ("wk", "k_proj", CFG.n_kv_heads)):
        hf_b = peft[f"base_model.model.model.layers.1.self_attn.{proj}.lora_B.weight"]
        hf_a = peft[f"base_model.model.model.layers.1.self_attn.{proj}.lora_A.weight"]
        assert not torch.equal(hf_b, ours[f"layers.1.attention.{lin}.lora_b"])  # the orders do differ
        assert torch.equal(converter_permute(hf_b, heads), ours[f"layers.1.attention.{lin}.lora_b"])
        assert torch.equal(hf_a, ours[f"layers.1.attention.{lin}.lora_a"])


# ---- errors -------------------------------------------------------------------------------------------------------

def test_export_refuses_bad_input_before_writing(model, tmp_path):
    sd, cfg = lora_state_dict(model), lora_config_of(model)
    a = sd["layers.0.attention.wq.lora_a"]
    path = tmp_path / "x.gguf"
    cases = [
        ({**sd, "layers.0.attention.wq.weight": a}, cfg, "not a LoRA adapter key"),
        ({**sd, "layers.0.feed_forward.wq.lora_a": a}, cfg, "not a LoRA adapter key"),
        ({k: v for k, v in sd.items() if k != "layers.1.feed_forward.w2.lora_b"}, cfg, r"w2\.lora_b is missing"),
        (sd, LoRAConfig(rank=8, alpha=8.0, targets=ORDER), "rank 8"),
        ({**sd, "layers.0.attention.wq.lora_b": torch.zeros(48, 3)}, cfg, "rank 4"),
        (sd, LoRAConfig(rank=4, alpha=8.0, targets=("wq", "wv")), "not in the config's targets"),
        ({k: v for k, v in sd.items() if ".wq." in k}, cfg, "no tensors are given"),
        ({}, LoRAConfig(rank=4, targets=("wq",)), "no adapter tensors"),
        ({**sd, "layers.0.attention.wq.lora_a": a[0]}, cfg, "2-D float tensor"),
    ]
    for tensors, c, msg in cases:
        with pytest.raises(ValueError, match=msg):
            export_llamacpp_lora(tensors, c, path)
        assert not path.exists() and not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="outtype 'q4_0' is unsupported; valid: f32, f16, bf16"):
        export_llamacpp_lora(sd, cfg, path, outtype="q4_0")
    assert not list(tmp_path.iterdir())


def _write(path, *, kv=None, tensors=None, alpha=8.0, drop=()):
    """A hand-made adapter GGUF: the good metadata (minus `drop`, plus `kv` as strings) and the given tensors."""
    w = gguf.GGUFWriter(str(path), kv.pop("general.architecture", "llama") if kv else "llama")
    meta = {"general.type": "adapter", "adapter.type": "lora", **(kv or {})}
    for k, v in meta.items():
        if k not in drop:
            w.add_string(k, v)
    if "adapter.lora.alpha" not in drop:
        (w.add_float64 if isinstance(alpha, np.float64) else w.add_float32)("adapter.lora.alpha", float(alpha))
    for name, arr in (tensors or {"blk.0.attn_q.weight.lora_a": np.ones((4, 48), np.float32),
                                  "blk.0.attn_q.weight.lora_b": np.ones((48, 4), np.float32)}).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_read_refuses_what_llamacpp_or_our_model_refuses(tmp_path):
    good = _write(tmp_path / "good.gguf")
    tensors, alpha = read_llamacpp_lora(good)
    assert alpha == 8.0 and set(tensors) == {"layers.0.attention.wq.lora_a", "layers.0.attention.wq.lora_b"}
    a = np.ones((4, 48), np.float32)
    cases = [
        (dict(kv={"general.type": "model"}), "'general.type' is 'model', expected 'adapter'"),
        (dict(drop=("general.type",)), "'general.type' is None"),
        (dict(kv={"adapter.type": "cvec"}), "'adapter.type' is 'cvec', expected 'lora'"),
        (dict(kv={"general.architecture": "qwen2"}), "'general.architecture' is 'qwen2', expected 'llama'"),
        (dict(drop=("adapter.lora.alpha",)), "'adapter.lora.alpha' is missing"),
        (dict(alpha=np.float64(8.0)), "llama.cpp reads only FLOAT32"),
        (dict(tensors={"blk.0.attn_q.weight.lora_a": a}), r"blk\.0\.attn_q\.weight\.lora_b is missing"),
        (dict(tensors={"blk.0.attn_q.weight.lora_b": a.T.copy()}), r"attn_q\.weight\.lora_a is missing"),
        (dict(tensors={"blk.0.attn_norm.weight": np.ones(48, np.float32)}), "'blk.0.attn_norm.weight'.*cannot map"),
        (dict(tensors={"token_embd.weight.lora_a": a}), "'token_embd.weight.lora_a'.*cannot map"),
        (dict(tensors={"blk.0.attn_q.weight.lora_a": a, "blk.0.attn_q.weight.lora_b": np.ones((48, 3), np.float32)}),
         "disagree on the rank"),
        (dict(tensors={"blk.0.attn_q.weight.lora_a": a, "blk.0.attn_q.weight.lora_b": np.ones((48, 4), np.float32),
                       "blk.0.attn_v.weight.lora_a": np.ones((2, 48), np.float32),
                       "blk.0.attn_v.weight.lora_b": np.ones((16, 2), np.float32)}), r"ranks \[2, 4\]"),
    ]
    for i, (kw, msg) in enumerate(cases):
        path = _write(tmp_path / f"bad{i}.gguf", **kw)
        with pytest.raises(ValueError, match=msg) as e:
            read_llamacpp_lora(path)
        assert str(path) in str(e.value)
    (tmp_path / "trunc.gguf").write_bytes(good.read_bytes()[:100])
    with pytest.raises(ValueError, match="unreadable GGUF"):
        read_llamacpp_lora(tmp_path / "trunc.gguf")
    with pytest.raises(FileNotFoundError):
        read_llamacpp_lora(tmp_path / "absent.gguf")


def test_alpha_zero_means_unscaled_like_llamacpp(tmp_path):
    """llama.cpp reads alpha 0 as scale = adapter_scale (no alpha / rank): our equivalent alpha is the rank."""
    _, alpha = read_llamacpp_lora(_write(tmp_path / "z.gguf", alpha=0.0))
    assert alpha == 4.0


def test_without_gguf_package_says_how_to_install(model, tmp_path, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_gguf(name, *args, **kwargs):
        if name == "gguf":
            raise ImportError("no gguf")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_gguf)
    with pytest.raises(ValueError, match=r"needs the 'gguf' package: pip install 'llama-lora-erc\[gguf\]'"):
        export_llamacpp_lora(lora_state_dict(model), lora_config_of(model), tmp_path / "x.gguf")
    assert not list(tmp_path.iterdir())
    (tmp_path / "y.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="needs the 'gguf' package"):
        read_llamacpp_lora(tmp_path / "y.gguf")
