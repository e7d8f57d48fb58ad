"""Activation checkpointing modes: full and selective compute exactly what no checkpointing computes, and
selective recomputes no matmul in backward while full recomputes every one."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from llama_erc.model.config import ModelConfig
from llama_erc.model.llama import Transformer
from llama_erc.kernels import select_ops
from llama_erc.model.lora import LoRAConfig, apply_lora, lora_state_dict

CFG = ModelConfig(dim=48, n_layers=2, n_heads=6, n_kv_heads=2, hidden_dim=100, vocab_size=97, max_seq_len=64)


def _model(mode: str, fused: bool, use_kernels: bool = False, device: str = "cpu",
           dtype: torch.dtype = torch.float32) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(CFG, activation_checkpointing=mode, ops=select_ops(triton=use_kernels, fused_lora=fused))
    model.init_weights(generator=torch.Generator().manual_seed(0))
    model.to(device, dtype)  # before LoRA: the adapters stay fp32
    apply_lora(model, LoRAConfig(rank=4, alpha=8, dropout=0.1, targets=("wq", "wv", "w2")), verbose=False)
    with torch.no_grad():  # B = 0 would leave A's gradients zero
        for p in lora_state_dict(model).values():
            p.copy_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)).to(device))
    return model.train()


def _loss(model: Transformer) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, CFG.vocab_size, (2, 11), generator=g)
    targets = torch.randint(0, CFG.vocab_size, (2, 11), generator=g)
    torch.manual_seed(5)  # the dropout masks
    return F.cross_entropy(model(tokens).float().flatten(0, 1), targets.flatten())


def _grads(model: Transformer) -> dict[str, torch.Tensor]:
    return {k: p.grad for k, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_checkpointing_is_exact(mode, fused):
    """Bit for bit on CPU: recomputation replays the same ops on the same inputs, dropout RNG included."""
    ref = _model("none", fused)
    loss_ref = _loss(ref)
    loss_ref.backward()
    model = _model(mode, fused)
    loss = _loss(model)
    loss.backward()
    torch.testing.assert_close(loss, loss_ref, rtol=0, atol=0)
    for k, g in _grads(ref).items():
        torch.testing.assert_close(_grads(model)[k], g, rtol=0, atol=0, msg=k)


def test_selective_checkpointing_with_triton_kernels():
    ref, model = _model("none", True, use_kernels=True), _model("selective", True, use_kernels=True)
    _loss(ref).backward()
    _loss(model).backward()
    for k, g in _grads(ref).items():
        torch.testing.assert_close(_grads(model)[k], g, rtol=1e-6, atol=1e-7, msg=k)


class _CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            self.n += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("fused", [False, True])
def test_selective_recomputes_no_matmul(fused):
    """Backward matmuls: none = the gradients' own; full = those + the block matmuls again; selective = none's."""
    counts = {}
    for mode in ("none", "full", "selective"):
        loss = _loss(_model(mode, fused))
        with _CountMatmuls() as c:
            loss.backward()
        counts[mode] = c.n
    with _CountMatmuls() as fwd:  # the block matmuls of one forward (the output projection is outside the blocks)
        _loss(_model("none", fused))
    block_matmuls = fwd.n - 1
    assert counts["selective"] == counts["none"], counts
    # full recomputes the blocks; non-reentrant checkpointing stops a block's recomputation once the tensors
    # backward needs are back, which can spare the block's last matmul (eager LoRA: w2's adapter product)
    assert block_matmuls - CFG.n_layers <= counts["full"] - counts["none"] <= block_matmuls, (counts, block_matmuls)


def test_checkpointing_mode_is_checked():
    model = Transformer(CFG, activation_checkpointing=True)
    assert model.activation_checkpointing == "full"
    model.activation_checkpointing = False
    assert model.activation_checkpointing == "none"
    with pytest.raises(ValueError, match="checkpointing must be one of none, full, selective"):
        model.activation_checkpointing = "some"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["full", "selective", "block"])
def test_checkpointing_matches_on_cuda(mode, dtype):
    """CUDA, Triton kernels, SDPA's CUDA attention ops in the kept set: the same loss and adapter gradients."""
    def run(m: str):
        model = _model(m, True, use_kernels=True, device="cuda", dtype=dtype)
        g = torch.Generator().manual_seed(2)
        tokens = torch.randint(0, CFG.vocab_size, (2, 11), generator=g).cuda()
        torch.manual_seed(5)
        model(tokens).float().logsumexp(-1).sum().backward()
        return {k: p.grad.float() for k, p in model.named_parameters() if p.requires_grad}

    ref, got = run("none"), run(mode)
    for k, g in ref.items():
        torch.testing.assert_close(got[k], g, rtol=1e-5, atol=1e-6 * g.abs().max().item(), msg=k)
