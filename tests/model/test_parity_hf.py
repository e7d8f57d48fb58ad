"""Logits parity with transformers.LlamaForCausalLM for every checkpoint form, on tiny random configs,
including Llama 3 rotary scaling, tied embeddings, and both at once.

Each config is saved by HF as sharded safetensors (form 3; Llama 3 configs also with config.json in
transformers 4's `rope_scaling` spelling); form 1 comes from `llama_erc.engine.convert`, form 2 is written as two
model-parallel consolidated.NN.pth shards, form 4 as an F32 GGUF in llama.cpp's layout. All load through
load_pretrained. Llama 3 configs run on 256 tokens (helpers_hf.LLAMA3_SEQ_LEN), where the scaling matters.
"""
import copy
import dataclasses

import pytest
import torch

pytest.importorskip("transformers")

from llama_erc.model.load import load_pretrained  # noqa: E402
from llama_erc.model.llama import Transformer  # noqa: E402
from tests.model.helpers_hf import SPECS, build_forms, tokens_for  # noqa: E402
from tests.tolerances import TOL, assert_close, max_rel_err  # noqa: E402

FORMS = ["hf", "hf_rope_scaling", "meta_st", "meta_pth", "gguf"]
BF16_LEN = 13  # bf16 runs use a 13-token prefix (causal: ref32's first 13 positions): error grows with length


@pytest.fixture(scope="module", params=SPECS, ids=lambda s: s.name)
def case(request, tmp_path_factory):
    spec = request.param
    hf_model, dirs = build_forms(spec, tmp_path_factory.mktemp(spec.name))
    tokens = tokens_for(spec)
    with torch.no_grad():
        ref32 = hf_model(tokens).logits.float()  # (B, T, V)
        # HF running the same weights in bf16 (on the first BF16_LEN tokens): the baseline for our own bf16 error
        hf_bf16 = copy.deepcopy(hf_model).to(torch.bfloat16)(tokens[:, :BF16_LEN]).logits.float()
    return spec, dirs, tokens, ref32, hf_bf16, hf_model


def _load(dirs, form, dtype):
    if form not in dirs:
        pytest.skip(f"no {form} form for this config (hf_rope_scaling: Llama 3 configs; gguf: the gguf package)")
    return load_pretrained(dirs[form], dtype=dtype)


@pytest.mark.parametrize("form", FORMS)
def test_parity_hf_fp32_logits(case, form):
    spec, dirs, tokens, ref32, _, _ = case
    model = _load(dirs, form, torch.float32)
    assert model.config.tie_embeddings == spec.tied
    assert model.config.rope_type == ("default" if spec.rope is None else "llama3")
    if spec.tied:  # one tensor, not two equal ones
        assert model.output.weight is model.tok_embeddings.weight
    with torch.no_grad():
        logits = model(tokens)
    assert logits.shape == (*tokens.shape, spec.vocab)
    err = max_rel_err(logits, ref32)
    assert err <= 1e-4, f"{spec.name}/{form}: max relative error {err:.2e}"


def test_parity_hf_llama3_scaling_is_exercised(case):
    """On these sequences plain rotary on the same weights is far from HF: the parity above tests the scaling."""
    spec, dirs, tokens, ref32, _, _ = case
    if spec.rope is None:
        pytest.skip("plain rotary")
    loaded = load_pretrained(dirs["meta_st"], dtype=torch.float32)
    plain = Transformer(dataclasses.replace(loaded.config, rope_type="default"))
    plain.load_state_dict(loaded.state_dict())
    with torch.no_grad():
        assert max_rel_err(plain(tokens), ref32) > 5e-3  # 50x the parity tolerance


@pytest.mark.parametrize("form", FORMS)
def test_parity_hf_bf16_logits(case, form):
    spec, dirs, tokens, ref32, hf_bf16, _ = case
    tokens, ref32 = tokens[:, :BF16_LEN], ref32[:, :BF16_LEN]
    model = _load(dirs, form, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    with torch.no_grad():
        logits = model(tokens)
    assert logits.dtype == torch.bfloat16
    rtol, atol = TOL["logits"][torch.bfloat16]
    # The ceiling is checked wherever HF's own bf16 run meets it: on the tied configs it does not (HF misses
    # it by up to 1e-2 on these weights), and there the ratio rule below is the bound.
    if torch.allclose(hf_bf16, ref32, rtol=rtol, atol=atol):
        assert_close(logits, ref32, (rtol, atol), msg=f"{spec.name}/{form} bf16 vs HF fp32")
    ours, theirs = (logits.float() - ref32).abs().max().item(), (hf_bf16 - ref32).abs().max().item()
    # same ratio rule as the kernels (STYLE.md §9): not much worse than HF running the same weights in bf16
    assert ours <= 2 * theirs + 1e-6, f"{spec.name}/{form}: bf16 error {ours:.3e} vs HF bf16 error {theirs:.3e}"


def test_parity_hf_positions_offset(case):
    """Explicit positions (a later chunk of a sequence) agree with HF's position_ids."""
    spec, dirs, tokens, _, _, hf = case
    pos = torch.arange(5, 5 + tokens.shape[1]).expand(tokens.shape[0], -1)
    model = load_pretrained(dirs["meta_st"], dtype=torch.float32)
    with torch.no_grad():
        err = max_rel_err(model(tokens, pos), hf(tokens, position_ids=pos).logits)
    assert err <= 1e-4, f"{spec.name}: positions offset, max relative error {err:.2e}"
