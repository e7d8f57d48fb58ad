"""Block recompute (model/recompute.py): losses and every LoRA gradient equal "none" and "full" bit for bit (fp32
and bf16, eager and fused LoRA, Triton kernels and twins, dropout, packed rows, quantized bases); backward runs no
forward GEMM of the base again; what it keeps is what saved_bytes_per_token says."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from llama_erc.kernels import select_ops
from llama_erc.model.config import ModelConfig
from llama_erc.model.llama import Transformer
from llama_erc.model.lora import LoRAConfig, apply_lora, lora_state_dict
from llama_erc.model.quant import QuantizedWeight, quantize_model
from llama_erc.model.recompute import KEPT, caches_gemm_outputs

# q8_0 needs rows of whole 32-element blocks: every in-dim (64, 96) is; rank 4 marks the adapter GEMMs
CFG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, vocab_size=97, max_seq_len=64)
RANK = 4
TARGETS = ("wq", "wv", "w1", "w2")  # wk, wo, w3 stay plain frozen linears (or QuantLinear)


def _model(mode: str, *, dtype=torch.float32, triton=False, fused=False, quant="none", dropout=0.1,
           targets=TARGETS) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(CFG, activation_checkpointing=mode)
    model.init_weights(generator=torch.Generator().manual_seed(0))
    model.to(dtype)  # before LoRA: the adapters stay fp32
    quantize_model(model, quant)
    apply_lora(model, LoRAConfig(rank=RANK, alpha=8, dropout=dropout, targets=targets), verbose=False)
    with torch.no_grad():  # B = 0 would leave A's gradients zero
        for p in lora_state_dict(model).values():
            p.copy_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    model.ops = select_ops(triton=triton, fused_lora=fused)
    return model.train()


def _batch(packed: bool):
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, CFG.vocab_size, (2, 11), generator=g)
    targets = torch.randint(0, CFG.vocab_size, (2, 11), generator=g)
    if not packed:
        return tokens, targets, None, None
    # two examples per row (lengths 5 + 6 and 7 + 4): block-diagonal causal mask, positions restart per example
    seg = torch.tensor([[0] * 5 + [1] * 6, [0] * 7 + [1] * 4])  # (B, T)
    causal = torch.ones(11, 11, dtype=torch.bool).tril()
    mask = (seg[:, :, None] == seg[:, None, :]) & causal  # (B, T, T)
    positions = torch.stack([torch.cat([torch.arange(5), torch.arange(6)]), torch.cat([torch.arange(7), torch.arange(4)])])
    return tokens, targets, positions, mask


def _run(model: Transformer, packed: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    tokens, targets, positions, mask = _batch(packed)
    torch.manual_seed(5)  # the dropout masks
    loss = F.cross_entropy(model(tokens, positions, mask).float().flatten(0, 1), targets.flatten())
    loss.backward()
    return loss.detach(), {k: p.grad for k, p in model.named_parameters() if p.requires_grad}


def _assert_same(mode: str, ref: str = "none", **kw) -> None:
    packed = kw.pop("packed", False)
    loss_ref, grads_ref = _run(_model(ref, **kw), packed)
    loss, grads = _run(_model(mode, **kw), packed)
    torch.testing.assert_close(loss, loss_ref, rtol=0, atol=0)
    assert grads.keys() == grads_ref.keys() and len(grads) == 2 * CFG.n_layers * len(kw.get("targets", TARGETS))
    for k, g in grads_ref.items():
        assert g.abs().max() > 0, k  # every adapter takes part
        torch.testing.assert_close(grads[k], g, rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("ref", ["none", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
def test_block_is_exact(ref, dtype, fused):
    """Bit for bit: the recompute replays the kept GEMM outputs and the dropout RNG; every other op is the same."""
    _assert_same("block", ref, dtype=dtype, fused=fused)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
def test_block_is_exact_with_triton_kernels(dtype, fused):
    _assert_same("block", dtype=dtype, fused=fused, triton=True)


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
def test_block_is_exact_on_packed_rows(fused):
    _assert_same("block", fused=fused, packed=True)


@pytest.mark.parametrize("quant", ["nf4", "q8_0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
def test_block_is_exact_on_a_quantized_base(quant, dtype, fused):
    """QuantLinear (wk, wo, w3) and LoRA over a quantized weight (wq, wv, w1, w2): dequant_linear's replay."""
    _assert_same("block", dtype=dtype, fused=fused, quant=quant)


def test_block_is_exact_with_every_linear_adapted():
    _assert_same("block", fused=True, targets=("wq", "wk", "wv", "wo", "w1", "w2", "w3"))


def test_block_without_dropout_and_in_eval_mode():
    _assert_same("block", dropout=0.0)
    model, ref = _model("block").eval(), _model("none").eval()  # eval: no dropout draws
    with torch.no_grad():
        torch.testing.assert_close(model(torch.arange(11)[None]), ref(torch.arange(11)[None]), rtol=0, atol=0)


class _CountBaseGemms(TorchDispatchMode):
    """mm/addmm calls with no dimension equal to the LoRA rank: the frozen base's GEMMs (forward x W^T, backward
    g W), not the adapters' rank-r products."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            a, b = args[-2], args[-1]
            if RANK not in (*a.shape, *b.shape):
                self.n += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("quant", ["none", "nf4"])
@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
def test_block_backward_runs_no_forward_gemm(fused, quant, monkeypatch):
    """Backward base GEMMs: none = one dx per linear; block = the same; full = those + the forward's again. A
    quantized base is dequantized in backward as often as under none too (once per linear, for dx)."""
    dequantized = []
    original = QuantizedWeight.dequantize
    monkeypatch.setattr(QuantizedWeight, "dequantize",
                        lambda self, *a, **k: dequantized.append(1) or original(self, *a, **k))
    counts, dequants = {}, {}
    for mode in ("none", "block", "full"):
        model = _model(mode, fused=fused, quant=quant)
        tokens, targets, _, _ = _batch(False)
        loss = F.cross_entropy(model(tokens).float().flatten(0, 1), targets.flatten())
        dequantized.clear()
        with _CountBaseGemms() as c:
            loss.backward()
        counts[mode], dequants[mode] = c.n, len(dequantized)
    assert counts["block"] == counts["none"], counts
    assert counts["full"] >= counts["none"] + 6 * CFG.n_layers, counts
    # none: one per linear whose input needs a gradient (not wq, wk, wv of layer 0: the embedding is frozen)
    assert dequants["block"] == dequants["none"] == (7 * CFG.n_layers - 3 if quant == "nf4" else 0), dequants
    assert dequants["full"] == dequants["none"] + (7 * CFG.n_layers if quant == "nf4" else 0), dequants


def test_caches_gemm_outputs():
    assert [m for m in ("none", "full", "selective", "block") if caches_gemm_outputs(m)] == ["selective", "block"]
    assert KEPT == ("wq", "wk", "wv", "wo", "w1", "w3")


def test_kept_outputs_written_in_place_are_caught():
    """An in-place write to a kept GEMM output (here by a hook on wk) is refused instead of corrupting backward."""
    model = _model("block")
    model.layers[0].attention.wk.register_forward_hook(lambda m, args, out: out.mul_(2.0))
    tokens, _, _, _ = _batch(False)
    with pytest.raises(RuntimeError, match="wk's output, kept for backward, was written in place"):
        model(tokens)
