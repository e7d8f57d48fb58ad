"""Logits parity with transformers.LlamaForCausalLM for every checkpoint form, on tiny random configs.

Each config is saved by HF as sharded safetensors (form 3); form 1 comes from `model.convert`, form 2 is
written as two model-parallel consolidated.NN.pth shards. All three load through load_pretrained.
"""
import copy

import pytest
import torch

pytest.importorskip("transformers")

from model.checkpoint import load_pretrained  # noqa: E402
from tests.model.helpers_hf import SPECS, build_forms, tokens_for  # noqa: E402
from tests.tolerances import TOL, assert_close, max_rel_err  # noqa: E402

FORMS = ["hf", "meta_st", "meta_pth"]


@pytest.fixture(scope="module", params=SPECS, ids=lambda s: s.name)
def case(request, tmp_path_factory):
    spec = request.param
    hf_model, dirs = build_forms(spec, tmp_path_factory.mktemp(spec.name))
    tokens = tokens_for(spec)
    with torch.no_grad():
        ref32 = hf_model(tokens).logits.float()  # (B, T, V)
        # HF running the same weights in bf16: the baseline for our own bf16 error
        hf_bf16 = copy.deepcopy(hf_model).to(torch.bfloat16)(tokens).logits.float()
    return spec, dirs, tokens, ref32, hf_bf16, hf_model


@pytest.mark.parametrize("form", FORMS)
def test_parity_hf_fp32_logits(case, form):
    spec, dirs, tokens, ref32, _, _ = case
    model = load_pretrained(dirs[form], dtype=torch.float32)
    with torch.no_grad():
        logits = model(tokens)
    assert logits.shape == (*tokens.shape, spec.vocab)
    err = max_rel_err(logits, ref32)
    assert err <= 1e-4, f"{spec.name}/{form}: max relative error {err:.2e}"


@pytest.mark.parametrize("form", FORMS)
def test_parity_hf_bf16_logits(case, form):
    spec, dirs, tokens, ref32, hf_bf16, _ = case
    model = load_pretrained(dirs[form], dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    with torch.no_grad():
        logits = model(tokens)
    assert logits.dtype == torch.bfloat16
    assert_close(logits, ref32, TOL["logits"][torch.bfloat16], msg=f"{spec.name}/{form} bf16 vs HF fp32")
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
