"""The tiny model running the Triton op set computes what it computes with the pure-torch reference ops:
same logits, same gradients for every parameter, same loss curve under AdamW. And the reference op set computes
bit for bit what the block computed before the residual add and ffn_norm became one op (add_rms_norm)."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import llama_erc.kernels as K
from llama_erc.kernels import select_ops
from llama_erc.model import Transformer, preset
from llama_erc.model.llama import ACTIVATION_CHECKPOINTING, TransformerBlock
from llama_erc.model.lora import LoRAConfig, apply_lora, lora_state_dict
from tests.tolerances import TOL, assert_close

CFG = preset("tiny")  # dim 64, 2 layers, 4 heads / 2 kv heads (GQA), hidden 176, vocab 512


def _models(dtype, device, **kw):
    """(reference model, kernel model) with the same weights; norm weights randomised so dw is tested."""
    torch.manual_seed(0)
    ref = Transformer(CFG, **kw)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    ker = Transformer(CFG, ops=select_ops(triton=True), **kw)
    ker.load_state_dict(ref.state_dict())
    assert all(block.ops.add_rms_norm is K.add_rms_norm for block in ker.layers)  # the fused op is under test
    return ref.to(device=device, dtype=dtype), ker.to(device=device, dtype=dtype)


def _batch(device, B=2, T=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, CFG.vocab_size, (B, T + 1), generator=g).to(device)
    return tokens[:, :-1], tokens[:, 1:]  # inputs, next-token targets


def _loss(model, tokens, targets, positions=None):
    logits = model(tokens, positions)
    return logits, F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def _assert_grads_close(ref, ker, tol):
    """Every parameter's grad, scaled by the largest |grad| of the reference (so atol is relative to it)."""
    ker_params = dict(ker.named_parameters())
    for name, p in ref.named_parameters():
        if p.grad is None:  # frozen in both
            assert ker_params[name].grad is None, f"{name}: frozen in the reference, yet the kernels gave a grad"
            continue
        g_ref, g_ker = p.grad.float(), ker_params[name].grad.float()
        scale = g_ref.abs().max().clamp_min(1e-12)
        assert_close(g_ker / scale, g_ref / scale, tol, msg=f"grad of {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("packed", [False, True], ids=["arange-pos", "per-row-pos"])
def test_model_kernels_match_reference(dtype, packed, device):
    ref, ker = _models(dtype, device)
    tokens, targets = _batch(device)
    positions = None
    if packed:  # two packed sequences per row: positions restart mid-row, (B, T) cos/sin tables
        positions = torch.cat([torch.arange(5), torch.arange(7)]).repeat(2, 1).to(device)
    logits_ref, loss_ref = _loss(ref, tokens, targets, positions)
    logits_ker, loss_ker = _loss(ker, tokens, targets, positions)
    assert logits_ker.dtype == logits_ref.dtype == dtype
    assert_close(logits_ker, logits_ref, TOL["logits"][dtype], msg="logits")
    loss_ref.backward()
    loss_ker.backward()
    _assert_grads_close(ref, ker, TOL["logits"][dtype])


def test_model_kernels_with_activation_checkpointing(device):
    # non-reentrant checkpointing reruns the kernels' forward inside backward
    ref, ker = _models(torch.float32, device, activation_checkpointing=True)
    tokens, targets = _batch(device)
    for m in (ref, ker):
        _loss(m, tokens, targets)[1].backward()
    _assert_grads_close(ref, ker, TOL["logits"][torch.float32])


def test_model_kernels_frozen_base_lora_style(device):
    # under LoRA the norms are frozen: only the projections train, and the norms get no grad at all
    ref, ker = _models(torch.float32, device)
    for m in (ref, ker):
        for name, p in m.named_parameters():
            p.requires_grad_(not name.endswith("norm.weight"))
    tokens, targets = _batch(device)
    for m in (ref, ker):
        _loss(m, tokens, targets)[1].backward()
    assert all(p.grad is None for n, p in ker.named_parameters() if n.endswith("norm.weight"))
    _assert_grads_close(ref, ker, TOL["logits"][torch.float32])


def test_model_kernels_training_losses_match(device):
    # same seed, 12 AdamW steps on random tokens: per-step losses within 1e-4 relative (fp32)
    losses = {}
    for use_kernels in (False, True):
        ref, ker = _models(torch.float32, device)
        model = ker if use_kernels else ref
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
        losses[use_kernels] = []
        for step in range(12):
            tokens, targets = _batch(device, B=2, T=8, seed=100 + step % 3)  # 3 batches cycled: loss falls
            loss = _loss(model, tokens, targets)[1]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses[use_kernels].append(loss.item())
    ref_losses, ker_losses = torch.tensor(losses[False]), torch.tensor(losses[True])
    assert ref_losses[-1] < ref_losses[0] - 0.5, f"the check needs a loss that moves: {ref_losses.tolist()}"
    rel = ((ker_losses - ref_losses).abs() / ref_losses.abs()).max().item()
    assert rel <= 1e-4, f"max relative loss difference {rel:.2e}\nref {ref_losses.tolist()}\nker {ker_losses.tolist()}"


def _block_forward_before_add_rms_norm(self, h, cos, sin, mask=None):
    """TransformerBlock.forward as it was before ops.add_rms_norm: the eager add, then ffn_norm."""
    h = h + self.attention(self.attention_norm(h), cos, sin, mask)
    return h + self.feed_forward(self.ffn_norm(h))


def _adapt(model, dropout: float) -> None:
    """LoRA (r=4) on wq, wv, wo, w1, w2 with random A and B (B = 0 would leave A's gradients zero); the adapters
    and the norms' weights are what trains."""
    apply_lora(model, LoRAConfig(rank=4, alpha=8, dropout=dropout, targets=("wq", "wv", "wo", "w1", "w2")),
               verbose=False)
    with torch.no_grad():
        for p in lora_state_dict(model).values():
            p.copy_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith(("lora_a", "lora_b", "norm.weight")))


def _lora_logits_and_grads(dtype, checkpointing):
    """Logits and every trainable grad (LoRA adapters with dropout, and the norms) of a tiny model, reference ops."""
    torch.manual_seed(0)
    model = Transformer(CFG, activation_checkpointing=checkpointing)
    model.init_weights(generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    model.to(dtype)
    _adapt(model, dropout=0.1)
    tokens, targets = _batch("cpu")
    torch.manual_seed(5)  # the dropout masks
    logits, loss = _loss(model.train(), tokens, targets)
    loss.backward()
    return logits, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("checkpointing", ["none", "selective"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_reference_ops_bit_identical_to_the_block_before_add_rms_norm(dtype, checkpointing, monkeypatch):
    logits, grads = _lora_logits_and_grads(dtype, checkpointing)
    monkeypatch.setattr(TransformerBlock, "forward", _block_forward_before_add_rms_norm)
    logits_before, grads_before = _lora_logits_and_grads(dtype, checkpointing)
    assert torch.equal(logits, logits_before)
    assert grads.keys() == grads_before.keys() and any(k.endswith("ffn_norm.weight") for k in grads)
    for k, g in grads_before.items():
        assert torch.equal(grads[k], g), k


# The in-place ops (q and k rotated into the projections' outputs, SwiGLU's backward over gate and up): used
# where activation checkpointing keeps no GEMM output, refused where it does, and the same bits either way.
IN_PLACE = {"apply_rope_qk_": "apply_rope_qk", "swiglu_": "swiglu"}  # each in-place op and its out-of-place op


def _counted(ops, calls):
    """ops with the rotary and SwiGLU fields wrapped to count the calls of each function (by its name) in `calls`."""
    def count(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return fn(*args, **kwargs)
        return wrapped
    names = [*IN_PLACE, *IN_PLACE.values()]
    return dataclasses.replace(ops, **{n: count(getattr(ops, n).__name__, getattr(ops, n)) for n in names})


def _grads_under(mode, dtype, in_place, calls, fused_lora=False):
    """A LoRA model (wk and w3 left plain: their outputs are bare GEMM outputs, what selective checkpointing
    keeps) under checkpointing `mode`: its logits and the adapters' and norms' gradients."""
    torch.manual_seed(0)
    model = Transformer(CFG, activation_checkpointing=mode)
    model.init_weights(generator=torch.Generator().manual_seed(0))
    _adapt(model, dropout=0.0)
    ops = select_ops(triton=True, fused_lora=fused_lora)
    if not in_place:  # every in-place field pointed at its out-of-place op
        ops = dataclasses.replace(ops, **{n: getattr(ops, m) for n, m in IN_PLACE.items()})
    model.ops = _counted(ops, calls)
    model.to(dtype)
    tokens, targets = _batch("cpu")
    positions = torch.cat([torch.arange(5), torch.arange(7)]).repeat(2, 1)  # per-row (packed) tables
    logits, loss = _loss(model, tokens, targets, positions)
    loss.backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("fused_lora", [False, True], ids=["eager-lora", "fused-lora"])
@pytest.mark.parametrize("mode", ACTIVATION_CHECKPOINTING)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_model_in_place_ops_by_checkpointing_mode(mode, dtype, fused_lora):
    # with the fused LoRA linear, wq's and w1's outputs are views made inside its custom Function: q is rotated
    # into a fresh tensor (k, from the plain wk, in place), and swiglu_'s backward still writes over gate and up
    calls, baseline_calls = {}, {}
    logits, grads = _grads_under(mode, dtype, in_place=True, calls=calls, fused_lora=fused_lora)
    # the in-place ops run where no GEMM output is kept ("none", "full": recomputed from the block input); under
    # "selective" (and "block") the outputs they would overwrite are kept, and the model takes the out-of-place op
    in_place_modes = ("none", "full")
    for name, out_of_place in IN_PLACE.items():
        n_calls = (1 if mode == "none" else 2) * CFG.n_layers  # checkpointing runs each block forward again
        expected = (n_calls, 0) if mode in in_place_modes else (0, n_calls)
        assert (calls.get(name, 0), calls.get(out_of_place, 0)) == expected, (name, calls)
    # the same logits and gradients as the out-of-place ops without checkpointing, bit for bit
    logits_ref, grads_ref = _grads_under("none", dtype, in_place=False, calls=baseline_calls, fused_lora=fused_lora)
    assert baseline_calls.get("apply_rope_qk_", 0) == baseline_calls.get("swiglu_", 0) == 0
    assert torch.equal(logits, logits_ref)
    assert grads.keys() == grads_ref.keys()
    for name, g in grads_ref.items():
        assert torch.equal(grads[name], g), name
