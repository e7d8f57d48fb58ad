"""The one-node LoRA linear (kernels/lora_linear.py) against its spec, reference.lora_linear (CPU)."""
import pytest
import torch
import torch.nn.functional as F

from llama_erc.model.config import ModelConfig
from llama_erc.model.llama import Transformer
from llama_erc.kernels import REFERENCE_OPS, select_ops
from llama_erc.model.lora import LoRAConfig, LoRALinear, apply_lora, lora_state_dict
from tests.tolerances import TOL, assert_close, max_rel_err

CFG = ModelConfig(dim=48, n_layers=2, n_heads=6, n_kv_heads=2, hidden_dim=100, vocab_size=97, max_seq_len=64)
ALL = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
IN, OUT = 40, 24


def _layer(rank: int, alpha: float, dropout: float, dtype: torch.dtype, in_dim: int = IN,
           out_dim: int = OUT) -> LoRALinear:
    """A LoRALinear with a unit-gain base weight in `dtype`, kaiming A and a non-zero B (B = 0 hides bugs)."""
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(out_dim, in_dim, generator=g) / in_dim ** 0.5).to(dtype)
    torch.manual_seed(0)  # kaiming init of A draws from the global generator
    layer = LoRALinear(w, LoRAConfig(rank, alpha, dropout))
    with torch.no_grad():
        layer.lora_b.copy_(0.1 * torch.randn(layer.lora_b.shape, generator=g))
    return layer.train()


def _run(layer: LoRALinear, x: torch.Tensor, dy: torch.Tensor, fused: bool, seed: int = 7):
    """Forward + backward with a fixed seed (so both paths draw the same dropout mask): y, dx, dA, dB."""
    layer.ops = select_ops(fused_lora=fused)
    layer.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(x.requires_grad)  # a fresh leaf with x's strides (clone would compact them)
    torch.manual_seed(seed)
    y = layer(x)
    y.backward(dy)
    return y, x.grad, layer.lora_a.grad, layer.lora_b.grad


def _input(shape: str, dtype: torch.dtype, requires_grad: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if shape == "BTC":
        x = torch.randn(2, 5, IN, generator=g)
    elif shape == "NC":
        x = torch.randn(7, IN, generator=g)
    else:  # non-contiguous (B, T, in): every other column of a wider tensor
        x = torch.randn(2, 5, 2 * IN, generator=g)[..., ::2]
        assert not x.is_contiguous()
    return x.to(dtype).requires_grad_(requires_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", ["BTC", "NC", "strided"])
@pytest.mark.parametrize("rank,alpha", [(1, 16), (8, 12)])  # scale 16 and 1.5 (not a power of two)
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("x_grad", [True, False])
def test_lora_fused_matches_eager(dtype, shape, rank, alpha, dropout, x_grad):
    layer = _layer(rank, alpha, dropout, dtype)
    x = _input(shape, dtype, x_grad)
    dy = torch.randn(*x.shape[:-1], OUT, generator=torch.Generator().manual_seed(2)).to(dtype)
    eager = _run(layer, x, dy, fused=False)
    fused = _run(layer, x, dy, fused=True)
    assert fused[0].shape == eager[0].shape and fused[0].dtype == dtype
    assert fused[2].dtype == fused[3].dtype == torch.float32  # fp32 adapter grads, like autograd through .to()
    if not x_grad:
        assert fused[1] is None and eager[1] is None
    for name, f, e in zip(("y", "dx", "dA", "dB"), fused, eager):
        if f is None:
            continue
        assert f.shape == e.shape and f.dtype == e.dtype, name
        if dtype is torch.float32:
            # 1e-5 on everything (dA, dB would be allowed the cross-row 1e-4); a different dropout mask
            # would miss by O(1), so this also shows that both paths drew the same mask
            assert_close(f, e, TOL["elementwise"][dtype], name)
        elif name in ("y", "dx"):
            assert_close(f, e, TOL["row"][dtype], name)
        else:
            # bf16 dA, dB are sums over N rows of products up to ~|90| (one bf16 ulp there is 0.5) and
            # some elements cancel to near 0, so they are judged relative to their largest element
            err = max_rel_err(f, e)
            assert err <= TOL["cross_row"][dtype][0], f"{name}: max relative error {err:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_fused_native_dropout_draws_eager_mask(dtype):
    """lora_fused uses torch.native_dropout; under one seed it must equal F.dropout / nn.Dropout bit for bit."""
    x = torch.randn(64, 128).to(dtype)
    for p in (0.05, 0.1, 0.3):
        torch.manual_seed(3)
        ref = F.dropout(x, p, True)
        torch.manual_seed(3)
        module = torch.nn.Dropout(p).train()(x)
        torch.manual_seed(3)
        out, mask = torch.native_dropout(x, p, True)
        assert mask.dtype == torch.bool
        assert torch.equal(out, ref) and torch.equal(module, ref)
        # the backward rebuilds x_d with native_dropout_backward: exact in fp32; in bf16 CPU's forward
        # multiplies by 1/(1-p) rounded to bf16 (so does F.dropout there) and the backward does not
        rebuilt = torch.ops.aten.native_dropout_backward(x, mask, 1.0 / (1.0 - p))
        if dtype is torch.float32:
            assert torch.equal(rebuilt, ref)
        else:
            assert_close(rebuilt, ref, TOL["elementwise"][dtype])


def test_lora_fused_weight_grad_when_asked():
    layer = _layer(4, 8, 0.1, torch.float32)
    layer.weight.requires_grad_(True)
    x = _input("BTC", torch.float32, True)
    dy = torch.randn(2, 5, OUT)
    _run(layer, x, dy, fused=False)
    dw_e = layer.weight.grad
    _run(layer, x, dy, fused=True)
    assert_close(layer.weight.grad, dw_e, TOL["elementwise"][torch.float32])


@pytest.mark.parametrize("device,dtype", [("cpu", torch.float32),
                                          pytest.param("cuda", torch.float32, marks=pytest.mark.gpu),
                                          pytest.param("cuda", torch.bfloat16, marks=pytest.mark.gpu)])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_lora_fused_whole_model_matches_eager(checkpointing, device, dtype):
    """On CUDA both paths draw dropout through the fused native_dropout kernel; bf16 compares at bf16 tolerance."""
    torch.manual_seed(0)
    model = Transformer(CFG, activation_checkpointing=checkpointing).to(device, dtype)
    apply_lora(model, LoRAConfig(rank=4, alpha=8, dropout=0.1, targets=ALL), verbose=False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in lora_state_dict(model).values():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    model.train()
    tokens = torch.randint(0, CFG.vocab_size, (2, 9), generator=g).to(device)
    targets = torch.randint(0, CFG.vocab_size, (2, 9), generator=g).to(device)
    tol = TOL["elementwise"][torch.float32] if dtype == torch.float32 else TOL["cross_row"][torch.bfloat16]

    def loss_and_grads(fused: bool):
        model.ops = select_ops(triton=device == "cuda", fused_lora=fused)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        loss = F.cross_entropy(model(tokens).float().flatten(0, 1), targets.flatten())
        loss.backward()
        return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}

    loss_e, grads_e = loss_and_grads(False)
    loss_f, grads_f = loss_and_grads(True)
    assert_close(loss_f, loss_e, tol, "loss")
    assert grads_f.keys() == grads_e.keys() == lora_state_dict(model).keys()
    for k in grads_e:
        if dtype == torch.float32:
            assert_close(grads_f[k], grads_e[k], tol, k)
        else:  # near-zero elements cancel in bf16: relative to the tensor's largest element (see the layer test)
            assert max_rel_err(grads_f[k], grads_e[k]) <= 2e-2, k
    assert list(model.layers[0].attention.wq.state_dict()) == ["weight", "lora_a", "lora_b"]  # no new state


def test_lora_fused_eval_no_grad_and_merged():
    layer = _layer(8, 16, 0.1, torch.float32)
    x = _input("BTC", torch.float32, False)
    for mode in ("eval", "no_grad"):
        layer.train(mode == "no_grad")  # no_grad in train mode: dropout still applies, same seed
        outs = []
        for fused in (False, True):
            layer.ops = select_ops(fused_lora=fused)
            torch.manual_seed(4)
            with torch.no_grad():
                outs.append(layer(x))
        assert not outs[1].requires_grad
        assert_close(outs[1], outs[0], TOL["row"][torch.float32], mode)
    layer.train()
    layer.merge()
    layer.ops = select_ops(fused_lora=False)
    ref = layer(x)
    layer.ops = select_ops(fused_lora=True)
    assert torch.equal(layer(x), ref)  # merged layers ignore the op: the adapter is already in W
    layer(x.requires_grad_()).sum().backward()
    assert layer.lora_a.grad is None and layer.lora_b.grad is None


def _saved_bytes(layer: LoRALinear, x: torch.Tensor, alive: tuple[torch.Tensor, ...]) -> int:
    """Bytes of distinct storages saved for backward by one forward, not counting those of `alive`."""
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()  # one entry per storage: views of one buffer count once
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        torch.manual_seed(0)
        layer(x)
    for t in alive:
        storages.pop(t.untyped_storage().data_ptr(), None)
    return sum(storages.values())


def test_lora_fused_saves_fewer_bytes():
    """One layer, N=64, in=out=128, r=8, bf16, dropout on: what the graph keeps besides x (alive anyway)."""
    layer = _layer(8, 16, 0.1, torch.bfloat16, in_dim=128, out_dim=128)
    x = torch.randn(64, 128).to(torch.bfloat16).requires_grad_()
    params = tuple(layer.parameters())
    counts = {}
    for fused in (False, True):
        layer.ops = select_ops(fused_lora=fused)
        counts[fused] = (_saved_bytes(layer, x, (x,)), _saved_bytes(layer, x, (x, *params)))
    msg = f"saved bytes (all but x, all but x and parameters): fused {counts[True]}, eager {counts[False]}"
    assert counts[True][0] < counts[False][0] and counts[True][1] < counts[False][1], msg
    # fused keeps the bool mask 64*128 and xa 64*8*2, besides W (bf16) and the fp32 A, B parameters themselves
    assert counts[True] == (64 * 128 + 64 * 8 * 2 + 128 * 128 * 2 + 2 * 8 * 128 * 4, 64 * 128 + 64 * 8 * 2), msg


def test_model_ops_reach_lora_layers_whenever_applied():
    """Transformer.ops is one choice for every module: LoRA layers applied after it run it too, and setting it
    again switches them all."""
    torch.manual_seed(0)
    fused = select_ops(fused_lora=True)
    model = Transformer(CFG, ops=fused)
    apply_lora(model, LoRAConfig(), verbose=False)
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert layers and all(m.ops is fused for m in layers)
    model.ops = REFERENCE_OPS
    assert all(m.ops is REFERENCE_OPS for m in model.modules() if hasattr(m, "ops"))
