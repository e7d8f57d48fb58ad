"""Small shared pieces for engine tests: a tiny LoRA model and synthetic supervised sequences."""
from __future__ import annotations

import random

import torch

from llama_erc.data import IGNORE_INDEX, Sequence
from llama_erc.engine.batching import Batch, padded_batch
from llama_erc.engine.build import build_lora_model
from llama_erc.engine.config import TrainConfig
from llama_erc.engine.loss import SupervisedLoss
from llama_erc.engine.runtime import setup_runtime


def synthetic_sequences(n: int, vocab: int = 512, seed: int = 0) -> list[Sequence]:
    """Variable-length rows whose last 1-3 tokens are supervised, like ERC label words."""
    rnd = random.Random(seed)
    seqs = []
    for _ in range(n):
        length = rnd.randint(6, 24)
        ids = tuple(rnd.randrange(3, vocab) for _ in range(length))
        n_sup = rnd.randint(1, 3)
        labels = tuple(IGNORE_INDEX if t < length - n_sup else ids[t] for t in range(length))
        seqs.append(Sequence(ids, labels))
    return seqs


def tiny_setup(cfg: TrainConfig):
    rt = setup_runtime(cfg.device if cfg.device != "auto" else "cpu", cfg.dtype, cfg.kernels)
    model, mcfg = build_lora_model(cfg.model, rt, cfg.lora, seed=cfg.seed,
                                   activation_checkpointing=cfg.activation_checkpointing, fused_lora=cfg.fused_lora,
                                   base_quant=cfg.base_quant)
    return rt, model, mcfg


def padded(seqs: list[Sequence], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """ids, labels (B, T) of the right-padded layout."""
    batch = padded_batch(seqs, pad_id)
    return batch.ids, batch.labels


def live_model(cfg: TrainConfig):
    """The tiny LoRA model with non-zero B: at init B = 0 would leave A's gradients zero."""
    _, model, _ = tiny_setup(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def loss_and_grads(model, batch: Batch):
    """Summed (weighted, when the batch has weights) supervised loss and every adapter gradient of one
    micro-batch, on the model's device, through the training step's fixed-length supervised gather."""
    model.zero_grad(set_to_none=True)
    batch = batch.to(next(model.parameters()).device)
    loss = SupervisedLoss(model)(*batch.loss_inputs())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def base_cfg(tmp_path, **kw) -> TrainConfig:
    defaults = dict(model="tiny", dtype="fp32", device="cpu", kernels="off", activation_checkpointing="none",
                    micro_batch=2, grad_accum=2, epochs=1, out_dir=str(tmp_path / "run"), lora_dropout=0.0,
                    lora_targets=("wq", "wk", "wv", "w2"), lr=1e-2, warmup_steps=1, save_every=100)
    defaults.update(kw)
    return TrainConfig(**defaults)

# Adam's update g / (sqrt(v) + eps) is close to sign(g) when |g| >> eps, so a 1e-9 difference in a near-zero
# gradient (fp32 sums taken in another order) can flip an update by lr. Equivalence tests of the batching
# math use a large eps, which makes Adam a smooth function of the gradient, and then compare tightly.
ADAM_EPS = 1.0  # with lr=1.0 the updates are still O(grad), large enough to compare
