"""`*-bnb-4bit` checkpoints (transformers + bitsandbytes NF4, double-quantized; model/forms.py, model/quant.py).

The checkpoints are synthetic (helpers_hf.save_bnb_4bit: a tiny random LlamaForCausalLM, its block linears
quantized with reference_nf4.quantize_nf4 and written under transformers' bnb key names, quant_state JSON and
quantization_config). The writer was checked once against a real save_pretrained of transformers 5.25 +
bitsandbytes 0.50.2 (CPU) from the same dense weights: same keys, dtypes, shapes, quant_state JSON bytes and
quantization_config; the tensors byte-identical but for one absmax code (bitsandbytes' CPU nested-absmax lookup
table, see reference_nf4's docstring). bitsandbytes itself is not needed here.

Checks: base_quant="nf4" holds the file's NF4 bytes (never requantized), q/k rows permuted exactly after
dequantization; its logits and those of base_quant="none" equal, bit for bit in fp32, the dense model whose linears
are the dequantized file tensors; skip modules stay dense; LoRA trains on it; the refusals name file and key.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("transformers")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from llama_erc.kernels.reference_nf4 import NF4Weight, dequantize_nf4, quantize_nf4  # noqa: E402
from llama_erc.model import LoRAConfig, apply_lora  # noqa: E402
from llama_erc.model import forms  # noqa: E402
from llama_erc.model.forms import open_weights  # noqa: E402
from llama_erc.model.hf_keys import meta_to_hf_key, permute_to_meta  # noqa: E402
from llama_erc.model.load import LoadError, load_pretrained  # noqa: E402
from llama_erc.model.quant import QuantizedWeight, QuantLinear, dequantize_nf4_chunked, quant_summary  # noqa: E402
from tests.model.helpers_hf import SPECS, TinySpec, make_hf_model, save_bnb_4bit, tokens_for  # noqa: E402

GQA = SPECS[0]  # 6 heads, 2 KV heads, nothing a power of two: blocks and nested groups cross rows
TIED = next(s for s in SPECS if s.name == "llama3_tied")
# in-dims of 64: each block of wq, wk, wv, wo, w1, w3 is one row (as in real models); w2 (in 160) still cuts rows
ROW64 = TinySpec("row64", hidden=64, heads=4, kv_heads=2, intermediate=160, vocab=53)
LINEARS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1", "feed_forward.w2",
           "feed_forward.w3")


def _file_tensors(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _dense_reference(spec, deq, tmp_path):
    """The dense HF checkpoint whose weights are what the bnb file dequantizes to (q/k still in HF order: the
    dense loader un-permutes them, permute_to_meta)."""
    ref = make_hf_model(spec)
    ref.load_state_dict(deq, strict=not spec.tied)
    ref.save_pretrained(tmp_path / "dense", safe_serialization=True)
    return tmp_path / "dense"


@pytest.fixture(scope="module", params=[GQA, TIED, ROW64], ids=lambda s: s.name)
def bnb(request, tmp_path_factory):
    spec = request.param
    root = tmp_path_factory.mktemp(f"bnb_{spec.name}")
    model = make_hf_model(spec)
    deq = save_bnb_4bit(model, root / "bnb", n_shards=1 if spec.tied else 3)
    return spec, root / "bnb", deq, _dense_reference(spec, deq, root)


def test_detected_and_collapsed(bnb):
    spec, path, _, dense = bnb
    with open_weights(path) as ckpt, open_weights(dense) as ref:
        assert ckpt.form == "hf-safetensors"
        assert set(ckpt.specs) == set(ref.specs)  # the bnb sub-keys collapsed into their weight keys
        assert {k: s[0] for k, s in ckpt.specs.items()} == {k: s[0] for k, s in ref.specs.items()}
        assert set(ckpt.nf4) == {f"layers.{i}.{m}.weight" for i in range(spec.layers) for m in LINEARS}
        for key, e in ckpt.nf4.items():
            assert e.row_heads == {"wq": spec.heads, "wk": spec.kv_heads}.get(key.split(".")[3])


def test_nf4_keeps_the_files_blocks(bnb):
    spec, path, _, _ = bnb
    file = _file_tensors(path)
    m = load_pretrained(path, dtype=torch.float32, base_quant="nf4")
    assert quant_summary(m)["formats"] == {"NF4": 7 * spec.layers}
    for i in range(spec.layers):
        for name in LINEARS:
            key = f"layers.{i}.{name}.weight"
            hf = meta_to_hf_key(key)
            qw = m.get_submodule(f"layers.{i}.{name}").weight
            assert isinstance(qw, QuantizedWeight) and qw.fmt == "NF4"
            assert torch.equal(qw.packed, file[hf].view(-1))  # byte for byte, in the file's (HF) row order
            assert torch.equal(qw.absmax_codes, file[f"{hf}.absmax"])
            assert torch.equal(qw.nested_absmax, file[f"{hf}.nested_absmax"])
            assert torch.equal(qw.nested_code, file[f"{hf}.nested_quant_map"])
            state = json.loads(bytes(file[f"{hf}.quant_state.bitsandbytes__nf4"].tolist()))
            assert qw.offset == state["nested_offset"] and list(qw.shape) == state["shape"]
            q = NF4Weight(file[hf].view(-1), file[f"{hf}.absmax"], file[f"{hf}.nested_absmax"],
                          file[f"{hf}.nested_quant_map"], state["nested_offset"], tuple(state["shape"]))
            heads = {"attention.wq": spec.heads, "attention.wk": spec.kv_heads}.get(name)
            for dt in (torch.float32, torch.bfloat16):
                want = dequantize_nf4(q, dt)
                want = want if heads is None else permute_to_meta(want, heads)
                assert torch.equal(qw.dequantize(dt), want), (key, dt)


def test_logits_equal_the_dequantized_dense_model(bnb):
    """fp32: nf4 (blocks kept) and none (dequantized at load) both compute, bit for bit, what the dense model of
    the dequantized file tensors computes; bf16: nf4 and none agree bit for bit."""
    spec, path, _, dense = bnb
    tokens = tokens_for(spec, length=13)
    with torch.no_grad():
        want = load_pretrained(dense, dtype=torch.float32)(tokens)
        for bq in ("nf4", "none"):
            got = load_pretrained(path, dtype=torch.float32, base_quant=bq)(tokens)
            assert torch.equal(got, want), bq
        bf = [load_pretrained(path, dtype=torch.bfloat16, base_quant=bq)(tokens) for bq in ("nf4", "none")]
    assert torch.equal(bf[0], bf[1])


def test_none_dequantizes_into_dtype(bnb):
    spec, path, deq, _ = bnb
    with open_weights(path) as ckpt:
        key = "layers.0.attention.wk.weight"
        assert ckpt.specs[key][1] == torch.float32  # the quant_state's dtype
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            w = ckpt.fetch(key, dt)
            assert w.dtype == dt
            # fp32 math, one rounding: the fp32 result cast once equals dequantizing straight into dt
            assert torch.equal(w, permute_to_meta(deq[meta_to_hf_key(key)], spec.kv_heads).to(dt))


def test_skip_modules_stay_dense(tmp_path):
    """llm_int8_skip_modules (and whatever the file holds dense) load as stored, also with base_quant nf4."""
    spec = GQA
    model = make_hf_model(spec)
    skip = ("model.layers.1.mlp.down_proj", "model.layers.0.self_attn.q_proj")
    deq = save_bnb_4bit(model, tmp_path / "bnb", skip=skip)
    cfg = json.loads((tmp_path / "bnb" / "config.json").read_text())
    assert cfg["quantization_config"]["llm_int8_skip_modules"] == ["lm_head", *skip]
    m = load_pretrained(tmp_path / "bnb", dtype=torch.float32, base_quant="nf4")
    assert quant_summary(m)["formats"] == {"NF4": 7 * spec.layers - 2}
    assert isinstance(m.layers[1].feed_forward.w2, torch.nn.Linear)
    assert isinstance(m.layers[0].attention.wq, torch.nn.Linear)
    assert torch.equal(m.layers[0].attention.wq.weight,
                       permute_to_meta(model.model.layers[0].self_attn.q_proj.weight.detach(), spec.heads))
    assert isinstance(m.layers[0].attention.wk, QuantLinear)
    tokens = tokens_for(spec)
    with torch.no_grad():
        want = load_pretrained(_dense_reference(spec, deq, tmp_path), dtype=torch.float32)(tokens)
        assert torch.equal(m(tokens), want)


def test_lora_trains_on_the_nf4_base(bnb):
    spec, path, _, _ = bnb
    m = load_pretrained(path, dtype=torch.float32, base_quant="nf4")
    apply_lora(m, LoRAConfig(rank=4, alpha=8, targets=("wq", "wk", "wv", "w2")), verbose=False)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("lora_b"):
                p.normal_()  # B = 0 at init would leave lora_a without a gradient
    tokens = tokens_for(spec, length=13)
    logits = m(tokens[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))
    loss.backward()
    trainable = {n: p for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_a", "lora_b")) for n in trainable)
    for n, p in trainable.items():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n
    assert quant_summary(m)["formats"] == {"NF4": 7 * spec.layers}
    assert all(p.grad is None for n, p in m.named_parameters() if not p.requires_grad)


def test_chunked_dequantization_is_the_same_bits():
    g = torch.Generator().manual_seed(3)
    for n in (16384 * 3 + 100, 16384 * 2, 16384 * 5 + 16384 // 2 + 1):
        q = quantize_nf4(torch.randn(n, generator=g))
        for dt in (torch.float32, torch.bfloat16):
            assert torch.equal(dequantize_nf4_chunked(q, dt, chunk=16384), dequantize_nf4(q, dt))
    with pytest.raises(ValueError, match="multiple of 16384"):
        dequantize_nf4_chunked(q, torch.float32, chunk=1000)


# ---- refusals ----

@pytest.fixture(scope="module")
def one_file(tmp_path_factory):
    """A single-file bnb checkpoint of GQA, copied and edited by the refusal tests."""
    path = tmp_path_factory.mktemp("bnb_one") / "bnb"
    save_bnb_4bit(make_hf_model(GQA), path)
    return path


def _copy(src, dst, qc: dict | None = None, drop_qc: bool = False):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    if drop_qc:
        del cfg["quantization_config"]
    if qc:
        cfg["quantization_config"].update(qc)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _edit_tensors(path, edit):
    f = path / "model.safetensors"
    with safe_open(str(f), "pt") as h:
        meta = h.metadata()
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f, metadata=meta)


@pytest.mark.parametrize("qc, match", [
    ({"bnb_4bit_quant_type": "fp4"}, "bnb_4bit_quant_type 'fp4' is not supported"),
    ({"bnb_4bit_use_double_quant": False}, "bnb_4bit_use_double_quant is False"),
    ({"load_in_4bit": False, "_load_in_4bit": False, "load_in_8bit": True, "_load_in_8bit": True},
     r"8-bit \(LLM.int8, load_in_8bit\) is not supported"),
    ({"quant_method": "gptq"}, "quant_method 'gptq' is not supported"),
    ({"bnb_4bit_quant_storage": "bfloat16"}, "bnb_4bit_quant_storage 'bfloat16' is not supported"),
])
def test_unsupported_quantization_refused_before_any_tensor_is_read(one_file, tmp_path, monkeypatch, qc, match):
    path = _copy(one_file, tmp_path / "m", qc)

    def no_read(*a, **k):
        raise AssertionError("a tensor was read")
    monkeypatch.setattr(forms._SafetensorsSet, "read", no_read)
    for bq in ("none", "nf4"):
        with pytest.raises(LoadError, match=match) as e:
            load_pretrained(path, dtype=torch.float32, base_quant=bq)
        assert str(path / "config.json") in str(e.value)


@pytest.mark.parametrize("bq", ["q8_0", "gguf"])
def test_other_base_quant_refused(one_file, bq):
    with pytest.raises(LoadError, match=f"bitsandbytes 4-bit \\(NF4\\) checkpoint; --base_quant {bq} cannot hold "
                                        "it .* use nf4 to keep its NF4 blocks, or none"):
        load_pretrained(one_file, dtype=torch.float32, base_quant=bq)


def test_missing_sub_key_refused(one_file, tmp_path):
    path = _copy(one_file, tmp_path / "m")
    key = "model.layers.1.mlp.up_proj.weight"
    _edit_tensors(path, lambda t: t.pop(f"{key}.nested_absmax"))
    with pytest.raises(LoadError, match=f"{path / 'model.safetensors'}: '{key}' is bitsandbytes 4-bit but "
                                        f"{key}.nested_absmax is missing"):
        load_pretrained(path, dtype=torch.float32, base_quant="nf4")


def _set_state(t, key, **fields):
    name = f"{key}.quant_state.bitsandbytes__nf4"
    state = json.loads(bytes(t[name].tolist()))
    state.update(fields)
    t[name] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)


def test_quant_state_shape_contradicting_config_refused(one_file, tmp_path):
    # the same element count, transposed: every header agrees, the model's shape does not
    path = _copy(one_file, tmp_path / "transposed")
    key = "model.layers.0.mlp.gate_proj.weight"  # (100, 48)
    _edit_tensors(path, lambda t: _set_state(t, key, shape=[48, 100]))
    with pytest.raises(LoadError, match=r"layers.0.feed_forward.w1.weight \(expected \(100, 48\), got \(48, 100\) "
                                        f"from the quant_state of {path / 'model.safetensors'}: {key}\\)"):
        load_pretrained(path, dtype=torch.float32, base_quant="nf4")
    # another element count: the packed bytes' header contradicts it
    path = _copy(one_file, tmp_path / "resized")
    key = "model.layers.1.self_attn.k_proj.weight"  # (16, 48)
    _edit_tensors(path, lambda t: _set_state(t, key, shape=[16, 40]))
    with pytest.raises(LoadError, match=f"{path / 'model.safetensors'}: '{key}' is torch.uint8 of shape "
                                        r"\(384, 1\), but the quant_state's shape \(16, 40\) needs torch.uint8 of "
                                        r"shape \(320, 1\)"):
        load_pretrained(path, dtype=torch.float32, base_quant="none")


@pytest.mark.parametrize("field, value, match", [
    ("blocksize", 128, "blocksize 128 is not supported"),
    ("quant_type", "fp4", "quant_type 'fp4' is not supported"),
    ("dtype", "int8", "dtype 'int8' is not one of"),
    ("nested_offset", None, "nested_offset None is not a finite number"),
])
def test_bad_quant_state_refused(one_file, tmp_path, field, value, match):
    path = _copy(one_file, tmp_path / "m")
    key = "model.layers.0.self_attn.v_proj.weight"
    _edit_tensors(path, lambda t: _set_state(t, key, **{field: value}))
    with pytest.raises(LoadError, match=f"{path / 'model.safetensors'}: '{key}.quant_state.bitsandbytes__nf4': "
                                        f"{match}"):
        load_pretrained(path, dtype=torch.float32, base_quant="nf4")


def test_fp4_tensors_refused_by_name(one_file, tmp_path):
    path = _copy(one_file, tmp_path / "m")
    key = "model.layers.0.self_attn.o_proj.weight"
    _edit_tensors(path, lambda t: t.__setitem__(f"{key}.quant_state.bitsandbytes__fp4",
                                                t.pop(f"{key}.quant_state.bitsandbytes__nf4")))
    with pytest.raises(LoadError, match=f"'{key}.quant_state.bitsandbytes__fp4': bitsandbytes quant type 'fp4' "
                                        "is not supported"):
        load_pretrained(path, dtype=torch.float32)


def test_wrong_nf4_table_refused(one_file, tmp_path):
    path = _copy(one_file, tmp_path / "m")
    key = "model.layers.0.mlp.up_proj.weight.quant_map"
    _edit_tensors(path, lambda t: t[key].__setitem__(3, 0.5))
    with pytest.raises(LoadError, match=f"'{key}' is not bitsandbytes' NF4 table"):
        load_pretrained(path, dtype=torch.float32)


def test_bnb_tensors_without_quantization_config_refused(one_file, tmp_path):
    path = _copy(one_file, tmp_path / "m", drop_qc=True)
    with pytest.raises(LoadError, match=f"{path / 'model.safetensors'}: tensor '.*' looks bitsandbytes-quantized, "
                                        f"but {path / 'config.json'} has no quantization_config"):
        load_pretrained(path, dtype=torch.float32)


def test_declared_but_not_quantized_refused(tmp_path):
    model = make_hf_model(GQA)
    model.save_pretrained(tmp_path / "m", safe_serialization=True)
    _copy(tmp_path / "m", tmp_path / "m2")
    cfg = json.loads((tmp_path / "m2" / "config.json").read_text())
    from tests.model.helpers_hf import bnb_quantization_config
    cfg["quantization_config"] = bnb_quantization_config()
    (tmp_path / "m2" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoadError, match="declares bitsandbytes 4-bit, but no tensor has a"):
        load_pretrained(tmp_path / "m2", dtype=torch.float32)
