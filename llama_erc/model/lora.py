"""Hand-written LoRA (Hu et al. 2021, arXiv:2106.09685) for the Meta-named LLaMA linears, and PEFT export.

    y = x W^T + s * B (A dropout(x))        W: (out, in) frozen    A: (r, in)    B: (out, r)    s = alpha / r

A is kaiming-uniform(a=sqrt(5)) and B is zero, as in PEFT, so step 0 equals the base model exactly.
Cast points: A and B (and their AdamW state) stay fp32; forward casts them to the activation dtype, so a
bf16 model runs bf16 matmuls and autograd returns fp32 grads through the cast. (PEFT instead upcasts x to
the adapter dtype; in fp32 the two are the same function.)
Merging folds the adapter into W for export or inference: W' = (W32 + s * B32 @ A32).to(W.dtype).

Trainable parameters are n_layers * sum over targets of r * (in + out). LLaMA-2-7B (32 layers, 4096 wide,
MHA so wk/wv are 4096 x 4096 too):
    r=8 on wq, wv :  32 * 2 * 8 * (4096 + 4096) = 4,194,304   (~4.2M, this module's default)
    r=4 on wq, wv :  32 * 2 * 4 * 8192          = 2,097,152   (~2.1M)
    r=8 on wq only:  32 * 1 * 8 * 8192          = 2,097,152   (~2.1M; wv alone is the same)
    r=2 on wq, wk, wv, wo:  32 * 4 * 2 * 8192   = 2,097,152   (~2.1M)
So "about 2.1M on 7B" is r=4 on wq,wv (or r=8 on one 4096 x 4096 projection), not r=8 on wq,wv.
`n_lora_params` computes the count from the configs without building a model.
The PEFT adapter format (export_peft / import_peft) lives in peft.py.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from llama_erc.kernels import REFERENCE_OPS, Ops
from llama_erc.model.config import ModelConfig
from llama_erc.model.quant import QuantLinear

VALID_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
_METADATA_KEY = "lora_config"  # safetensors metadata entry holding asdict(LoRAConfig) as JSON


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] = ("wq", "wv")  # Meta linear names; a list is accepted and stored as a tuple

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))  # normalise only: lists from JSON/CLI
        if self.rank <= 0:
            raise ValueError(f"LoRAConfig.rank must be positive, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"LoRAConfig.alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRAConfig.dropout must be in [0, 1), got {self.dropout}")
        unknown = [t for t in self.targets if t not in VALID_TARGETS]
        if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
            raise ValueError(f"LoRAConfig.targets {list(self.targets)}: unknown {unknown}, empty or repeated; "
                             f"valid targets: {', '.join(VALID_TARGETS)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nn.Module):
    """y = x W^T + (alpha / r) * dropout(x) A^T B^T, bias-free. Takes over an existing weight tensor (no copy).

    The base key stays `weight`, so base checkpoints load unchanged. A and B are created on the weight's
    device in fp32; on the meta device they stay uninitialised until `reset_lora_parameters()`.
    """

    def __init__(self, weight: Tensor | nn.Module, cfg: LoRAConfig, ops: Ops = REFERENCE_OPS):
        super().__init__()
        out_dim, in_dim = weight.shape
        if isinstance(weight, Tensor):
            self.weight = nn.Parameter(weight.detach(), requires_grad=False)  # shares storage with the old weight
        else:  # a frozen quantized weight (model/quant.py): a module of packed parameters, kept as it is
            self.weight = weight
        self.lora_a = nn.Parameter(torch.empty(cfg.rank, in_dim, dtype=torch.float32, device=weight.device))
        self.lora_b = nn.Parameter(torch.empty(out_dim, cfg.rank, dtype=torch.float32, device=weight.device))
        self.rank, self.alpha, self.scale = cfg.rank, cfg.alpha, cfg.scale
        self.dropout_p = cfg.dropout  # on the adapter's input, while training
        self.merged = False
        # the eager graph or the one-node op (kernels/lora_linear.py): the same function, so not config, and
        # adapter files are the same either way; Transformer.ops sets it for every layer
        self.ops: Ops = ops
        # pre-merge weight, only while merged with keep_original=True; a non-persistent buffer so that
        # .to(device) moves it but state_dict() and checkpoints never see it
        self.register_buffer("original_weight", None, persistent=False)
        if not weight.is_meta:
            self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A ~ kaiming-uniform(a=sqrt(5)) like nn.Linear/PEFT, B = 0. Call after meta materialisation.

        If the adapters are still on meta while the base weight is real (the base was loaded with
        load_state_dict(assign=True) after apply_lora), they are first allocated beside the weight.
        """
        if self.lora_a.is_meta and not self.weight.is_meta:
            dev = self.weight.device
            self.lora_a = nn.Parameter(torch.empty_like(self.lora_a, device=dev), self.lora_a.requires_grad)
            self.lora_b = nn.Parameter(torch.empty_like(self.lora_b, device=dev), self.lora_b.requires_grad)
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b)

    def delta_weight(self) -> Tensor:
        """s * B @ A in fp32: (out, in)."""
        return self.scale * (self.lora_b.detach().float() @ self.lora_a.detach().float())

    def merge(self, keep_original: bool = False) -> None:
        """W <- (W32 + s * B32 @ A32).to(W.dtype); forward then skips the adapter path (and gives it no grads).

        The merged weight is a new tensor, never an in-place write, so a mmap'd or shared base is untouched.
        keep_original=True holds on to the old tensor (one extra copy of each merged weight's memory while
        merged) so that unmerge() restores it bit for bit; without it unmerge() subtracts, see there.
        A quantized base merges to a dense (deq(Wq)32 + s * B32 @ A32) in the compute dtype: the adapters were
        trained on deq(Wq), so that is their model, and it is not what merging into the unquantized W16 the
        file was made from would give. Its packed weight is always kept, so unmerge() restores it exactly.
        """
        if self.merged:
            raise RuntimeError("LoRALinear.merge: already merged")
        w = self.weight
        if isinstance(w, Tensor):
            self.original_weight = w.detach() if keep_original else None
            w32 = w.float()
        else:  # quantized: the packed module is small, always kept
            self.quantized_original = w
            w32 = w.dequantize(torch.float32)
        self.weight = nn.Parameter((w32 + self.delta_weight()).to(w.dtype), requires_grad=False)
        self.merged = True

    def unmerge(self) -> None:
        """Undo merge(). Exact with keep_original=True. Otherwise W <- (W'32 - s * B32 @ A32).to(W.dtype),
        which carries the merge's rounding: within a few ulps in fp32, but in bf16 an element can end one
        bf16 ulp (of |W| + |s BA|) away from the original, and repeated merge/unmerge cycles can drift.
        """
        if not self.merged:
            raise RuntimeError("LoRALinear.unmerge: not merged")
        if getattr(self, "quantized_original", None) is not None:
            packed, self.quantized_original = self.quantized_original, None
            del self.weight  # a Parameter now: nn.Module refuses to assign a module over it
            self.weight = packed
            self.merged = False
            return
        w = self.weight
        if self.original_weight is not None:
            restored, self.original_weight = self.original_weight, None
        else:
            restored = (w.float() - self.delta_weight()).to(w.dtype)
        self.weight = nn.Parameter(restored, requires_grad=False)
        self.merged = False

    def forward(self, x: Tensor) -> Tensor:  # x: (..., in) -> (..., out)
        if self.merged:
            return F.linear(x, self.weight)
        return self.ops.lora_linear(x, self.weight, self.lora_a, self.lora_b, self.scale, self.dropout_p,
                                    self.training)

    def extra_repr(self) -> str:
        out_dim, in_dim = self.weight.shape
        return f"in={in_dim}, out={out_dim}, rank={self.rank}, alpha={self.alpha}, merged={self.merged}"


def _lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def n_lora_params(model_cfg: ModelConfig, cfg: LoRAConfig) -> int:
    """Trainable adapter parameters for a model config, without building the model: n_layers * sum r*(in+out)."""
    kv = model_cfg.n_kv_heads * model_cfg.head_dim
    d, f = model_cfg.dim, model_cfg.hidden_dim
    in_out = {"wq": (d, d), "wk": (d, kv), "wv": (d, kv), "wo": (d, d), "w1": (d, f), "w2": (f, d), "w3": (d, f)}
    return model_cfg.n_layers * sum(cfg.rank * sum(in_out[t]) for t in cfg.targets)


def apply_lora(model: nn.Module, cfg: LoRAConfig | None = None, verbose: bool = True, **fields) -> nn.Module:
    """Swap every bias-free nn.Linear named in cfg.targets for a LoRALinear; freeze all else. Returns model.

    The settings come as a LoRAConfig or as its fields: apply_lora(model, rank=8, alpha=16, dropout=0.05,
    targets=("wq", "wv")); fields left out take LoRAConfig's defaults.

    The base weight tensors are handed over, not copied. Call it on a model whose base weights are real
    (adapters get initialised at once) or on a meta model (then materialise and reset_lora_parameters).
    Prints the trainable count unless verbose=False (e.g. on non-zero ranks). Cast the base to its dtype
    before this call: a later model.to(dtype) would cast the fp32 adapters too.
    """
    if cfg is None:
        cfg = LoRAConfig(**fields)
    elif fields:
        raise ValueError(f"apply_lora: pass a LoRAConfig or its fields, not both (got {sorted(fields)})")
    if _lora_modules(model):
        raise ValueError("apply_lora: the model already has LoRA layers")
    swaps = [(name, m) for name, m in model.named_modules()
             if name.rsplit(".", 1)[-1] in cfg.targets and isinstance(m, (nn.Linear, QuantLinear))]  # both take adapters
    if not swaps:
        raise ValueError(f"apply_lora: no nn.Linear named {list(cfg.targets)} in the model")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, m in swaps:
        if m.bias is not None:
            raise ValueError(f"apply_lora: {name} has a bias; LoRALinear is bias-free like LLaMA")
        parent_name, _, attr = name.rpartition(".")
        # the layer runs the model's op set (Transformer.ops), whichever was chosen before LoRA was applied
        setattr(model.get_submodule(parent_name), attr, LoRALinear(m.weight, cfg, getattr(model, "ops", REFERENCE_OPS)))
    if verbose:
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in model.parameters())
        print(f"LoRA r={cfg.rank} alpha={cfg.alpha} on {','.join(cfg.targets)}: {n_train:,} trainable "
              f"parameters of {n_all:,} ({100 * n_train / n_all:.4f}%)")
    return model


def reset_lora_parameters(model: nn.Module) -> None:
    """reset_lora_parameters() on every LoRALinear (after to_empty / assign-loading a meta-built model)."""
    for m in _lora_modules(model).values():
        m.reset_lora_parameters()


def merge_lora(model: nn.Module, keep_original: bool = False) -> None:
    for m in _lora_modules(model).values():
        m.merge(keep_original)


def unmerge_lora(model: nn.Module) -> None:
    for m in _lora_modules(model).values():
        m.unmerge()


def lora_config_of(model: nn.Module) -> LoRAConfig:
    """The LoRAConfig the model's adapters were built with, read off the layers (dropout from the first)."""
    mods = _lora_modules(model)
    if not mods:
        raise ValueError("model has no LoRA layers; call apply_lora first")
    first = next(iter(mods.values()))
    if any((m.rank, m.alpha) != (first.rank, first.alpha) for m in mods.values()):
        raise ValueError("LoRA layers disagree on rank/alpha; one LoRAConfig per model is supported")
    names = {n.rsplit(".", 1)[-1] for n in mods}
    return LoRAConfig(first.rank, first.alpha, first.dropout_p, tuple(t for t in VALID_TARGETS if t in names))


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Only the adapters: {'layers.3.attention.wq.lora_a': (r, in), '...lora_b': (out, r)}, detached fp32."""
    return {k: v.detach() for k, v in model.named_parameters() if k.endswith((".lora_a", ".lora_b"))}


def _check_keys(expected: dict[str, Tensor], got: dict[str, tuple[int, ...]], source: str) -> None:
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    mismatched = sorted(f"{k}: file {got[k]} vs model {tuple(expected[k].shape)}"
                        for k in set(expected) & set(got) if tuple(expected[k].shape) != got[k])
    if missing or unexpected or mismatched:
        raise ValueError(f"{source}: adapter does not fit the model; missing keys {missing}, "
                         f"unexpected keys {unexpected}, shape mismatches {mismatched}")


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def _copy_into(model: nn.Module, tensors: dict[str, Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():  # copy_ keeps each adapter's fp32 dtype and device
        for k, v in tensors.items():
            params[k].copy_(v)


def save_adapters(model: nn.Module, path: str | Path) -> None:
    """Adapters only, as safetensors, with asdict(LoRAConfig) as JSON in the file's metadata."""
    meta = {_METADATA_KEY: json.dumps(asdict(lora_config_of(model))), "format": "pt"}
    save_file({k: v.contiguous() for k, v in lora_state_dict(model).items()}, str(path), metadata=meta)


def load_adapters(model: nn.Module, path: str | Path) -> None:
    """Load save_adapters() output into a model that already has LoRA applied; checks config, keys, shapes."""
    path = Path(path)
    tensors, meta = _read_safetensors(path)
    if _METADATA_KEY in meta:
        try:
            saved = LoRAConfig(**json.loads(meta[_METADATA_KEY]))
        except (TypeError, ValueError) as e:  # JSONDecodeError is a ValueError
            raise ValueError(f"{path}: unreadable LoRA config in the file's metadata ({e})") from None
        ours = lora_config_of(model)
        # dropout only matters while training, so it may differ; rank, alpha and targets may not
        if (saved.rank, saved.alpha, saved.targets) != (ours.rank, ours.alpha, ours.targets):
            raise ValueError(f"{path}: adapter was saved with {saved}, the model has {ours}")
    _check_keys(lora_state_dict(model), {k: tuple(v.shape) for k, v in tensors.items()}, str(path))
    _copy_into(model, tensors)
