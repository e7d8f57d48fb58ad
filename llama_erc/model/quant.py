"""A frozen base held quantized: packed blocks in the model, dequantized a layer at a time.

    --base_quant none   every base weight in the compute dtype (the default)
    --base_quant gguf   a GGUF file's quantized tensors kept as the file's own blocks (Q8_0, Q4_0, Q4_1, Q4_K,
                        Q5_K, Q6_K): the linears, the token embedding (rows gathered, then dequantized) and an
                        untied output; F32/F16/BF16 tensors (norms) load as before. Trains on exactly the
                        weights llama.cpp serves from that file.
    --base_quant nf4    the seven linears of every block quantized at load, tensor by tensor, to NF4 (QLoRA;
    --base_quant q8_0   bitsandbytes' layout, kernels/reference_nf4.py) or to GGUF Q8_0; embedding, output and
                        norms stay in the compute dtype, as QLoRA keeps them. On a `*-bnb-4bit` checkpoint
                        (transformers + bitsandbytes NF4, model/forms.py) nf4 keeps the file's own NF4 blocks
                        instead, never requantizing, and what the file holds dense stays dense.

A QuantizedWeight is a module whose packed tensors are parameters with requires_grad=False (not buffers: DDP
re-broadcasts buffers every step, and these never change), with its format, shape and compute dtype. It stands
where a weight Parameter stood: QuantLinear (a frozen linear), QuantEmbedding, and LoRALinear's base, whose
forward dequantizes (ops.dequant_gguf / ops.dequant_nf4: the Triton kernels or their bit-exact twins) inside one
autograd node that saves no weight (kernels/dequant_linear.py, kernels/lora_linear.py) and dequantizes again
for dx in backward. So at most one layer's weight is ever dequantized at a time, with or without activation
checkpointing.

Exactness: dequantization is fp32 math rounded once into the compute dtype, the same function as the GGUF
loader's dequantize-at-load path (gguf.quants), so a `gguf` model computes bit for bit what the `none` model of
the same file computes; likewise for a bnb-4bit file (forms.py dequantizes it at load with
dequantize_nf4_chunked, the same math).

HF q/k row order (bnb-4bit files): HF stores q_proj/k_proj rows in rotate-half order, and our attention needs
Meta's interleaved order (model/hf_keys.py). A row permutation cannot be applied to NF4 bytes exactly in general
(64-element blocks and 256-block nested groups cross row boundaries), so such a QuantizedWeight keeps the file's
bytes in HF order and carries `row_heads`: dequantize() returns permute_to_meta(W, row_heads), a pure copy of
the dequantized rows (exact; one gather per dequantization, no extra tensor or state-dict key).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from llama_erc.kernels import REFERENCE_OPS, Ops, dequant_linear
from llama_erc.kernels.reference_gguf import GGUF_BLOCKS, dequantize_gguf, quantize_q8_0
from llama_erc.kernels.reference_nf4 import (NESTED_BLOCK, NF4_BLOCK, NF4Weight, check_nf4_weight, dequantize_nf4,
                                             quantize_nf4)
from llama_erc.model.hf_keys import permute_to_meta

BASE_QUANT = ("none", "gguf", "nf4", "q8_0")
QUANTIZED_AT_LOAD = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")  # what nf4 / q8_0 quantize: the block linears
_NF4_FIELDS = ("packed", "absmax_codes", "nested_absmax", "nested_code")
_TWIN_CHUNK = 1 << 20  # elements per call of the pure-torch GGUF twin (dequantize_gguf_chunked)
_NF4_GROUP = NF4_BLOCK * NESTED_BLOCK  # 16384 elements: one nested absmax's span, so chunks cut no group


def dequantize_nf4_chunked(q: NF4Weight, dtype: torch.dtype, chunk: int = 64 * _NF4_GROUP) -> Tensor:
    """reference_nf4.dequantize_nf4(q, dtype), filled `chunk` elements at a time (a multiple of 16384, so every
    chunk is whole 64-element blocks and whole 256-block nested groups): the same elementwise fp32 math, so the
    same bits, with fp32/int64 temporaries of one chunk instead of several times the whole weight."""
    check_nf4_weight(q)
    if chunk <= 0 or chunk % _NF4_GROUP:
        raise ValueError(f"chunk must be a positive multiple of {_NF4_GROUP}, got {chunk}")
    n = q.numel
    if n <= chunk:
        return dequantize_nf4(q, dtype)
    out = torch.empty(n, dtype=dtype, device=q.packed.device)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        part = NF4Weight(q.packed[s // 2:-(-e // 2)], q.absmax_codes[s // NF4_BLOCK:-(-e // NF4_BLOCK)],
                         q.nested_absmax[s // _NF4_GROUP:-(-e // _NF4_GROUP)], q.nested_code, q.offset, (e - s,))
        out[s:e] = dequantize_nf4(part, dtype)
    return out.view(q.shape)


def dequantize_gguf_chunked(data: Tensor, fmt: str, shape: tuple[int, int], dtype: torch.dtype) -> Tensor:
    """reference_gguf.dequantize_gguf of (rows, bytes per row) blocks, filled _TWIN_CHUNK elements of whole rows
    at a time: the twin's fp32 temporaries are several times its output (a 49k x 576 tied embedding: ~0.5 GB);
    elementwise math, so the same bits either way."""
    n, cols = shape
    if n * cols <= _TWIN_CHUNK:
        return dequantize_gguf(data, fmt, shape, dtype)
    out = torch.empty(shape, dtype=dtype, device=data.device)
    step = max(1, _TWIN_CHUNK // cols)
    for r in range(0, n, step):
        part = data[r:r + step]
        out[r:r + step] = dequantize_gguf(part, fmt, (part.shape[0], cols), dtype)
    return out


class QuantizedWeight(nn.Module):
    """A frozen (out, in) weight as packed blocks. fmt: a GGUF type name (GGUF_BLOCKS) or "NF4".

    GGUF: `blocks` uint8 (rows, bytes per row), every row whole blocks (GGUF requires it), so rows can be
    gathered. NF4: bitsandbytes' fields (reference_nf4.NF4Weight) over the row-major flattened weight.
    row_heads (NF4 only): the packed rows are in HF's rotate-half q/k order of that many heads (a bnb-4bit file's
    q_proj/k_proj, kept byte for byte); dequantize() returns them in Meta's order, permute_to_meta(W, row_heads).
    """

    def __init__(self, fmt: str, shape: tuple[int, ...], dtype: torch.dtype, tensors: dict[str, Tensor],
                 offset: float = 0.0, ops: Ops = REFERENCE_OPS, row_heads: int | None = None):
        super().__init__()
        self.fmt, self.shape, self.dtype, self.offset, self.ops = fmt, tuple(shape), dtype, float(offset), ops
        self.row_heads = row_heads
        if row_heads is not None:
            if fmt != "NF4":
                raise ValueError(f"row_heads is for NF4 weights kept in HF's q/k row order, not {fmt}")
            if len(self.shape) != 2 or row_heads < 1 or self.shape[0] % (2 * row_heads):
                raise ValueError(f"row_heads {row_heads} does not split the {self.shape} weight's rows into heads "
                                 "of rotary pairs")
        if fmt == "NF4":
            names = _NF4_FIELDS
        elif fmt in GGUF_BLOCKS:
            names = ("blocks",)
            elems, nbytes = GGUF_BLOCKS[fmt]
            if len(self.shape) != 2 or self.shape[1] % elems:
                raise ValueError(f"{fmt} weight of shape {self.shape}: rows must be whole {elems}-element blocks")
            want = (self.shape[0], self.shape[1] // elems * nbytes)
            if tuple(tensors["blocks"].shape) != want or tensors["blocks"].dtype != torch.uint8:
                raise ValueError(f"{fmt} blocks of shape {self.shape} must be uint8 {want}, got "
                                 f"{tensors['blocks'].dtype} {tuple(tensors['blocks'].shape)}")
        else:
            raise ValueError(f"unknown quantized format {fmt!r}; known: NF4, {', '.join(GGUF_BLOCKS)}")
        for name in names:
            self.register_parameter(name, nn.Parameter(tensors[name], requires_grad=False))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def is_meta(self) -> bool:
        return self.device.type == "meta"

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def dequantize(self, dtype: torch.dtype | None = None, rows: Tensor | None = None) -> Tensor:
        """The weight (out, in) in dtype (default: the compute dtype), or only `rows` (N,) of it: (N, in)."""
        dtype = dtype or self.dtype
        if self.fmt == "NF4":
            if rows is not None:
                raise ValueError("row gathering is for GGUF blocks; NF4 quantizes whole linears only")
            q = NF4Weight(self.packed, self.absmax_codes, self.nested_absmax, self.nested_code, self.offset,
                          self.shape)
            # the twin, chunked: the same bits with temporaries of one chunk (as for GGUF below)
            w = dequantize_nf4_chunked(q, dtype) if self.ops.dequant_nf4 is dequantize_nf4 else \
                self.ops.dequant_nf4(q, dtype)
            return w if self.row_heads is None else permute_to_meta(w, self.row_heads)
        data = self.blocks if rows is None else self.blocks[rows]  # (rows, bytes per row)
        shape = (data.shape[0], self.shape[1])
        if self.ops.dequant_gguf is dequantize_gguf:  # the twin, chunked (as NF4 above)
            return dequantize_gguf_chunked(data, self.fmt, shape, dtype)
        return self.ops.dequant_gguf(data, self.fmt, shape, dtype)

    def linear(self, x: Tensor) -> Tensor:
        return dequant_linear(x, self)

    def extra_repr(self) -> str:
        rows = "" if self.row_heads is None else f", HF q/k rows of {self.row_heads} heads"
        return f"{self.fmt}, shape={self.shape}, dtype={self.dtype}, {self.nbytes:,} bytes{rows}"


class QuantLinear(nn.Module):
    """A frozen bias-free linear over a quantized weight: y = x deq(W)^T."""

    def __init__(self, weight: QuantizedWeight):
        super().__init__()
        self.weight, self.bias = weight, None

    def forward(self, x: Tensor) -> Tensor:
        return self.weight.linear(x)


class QuantEmbedding(nn.Module):
    """A frozen embedding over GGUF blocks: the tokens' rows gathered, then dequantized."""

    def __init__(self, weight: QuantizedWeight):
        super().__init__()
        if weight.fmt == "NF4":
            raise ValueError("QuantEmbedding needs row-aligned GGUF blocks, not NF4")
        self.weight = weight

    def forward(self, tokens: Tensor) -> Tensor:  # (B, T) -> (B, T, D)
        rows = self.weight.dequantize(rows=tokens.reshape(-1))  # (B*T, D)
        return rows.view(*tokens.shape, self.weight.shape[1])


def nf4_quantized_weight(q: NF4Weight, dtype: torch.dtype, ops: Ops = REFERENCE_OPS,
                         device: str | torch.device | None = None, row_heads: int | None = None) -> QuantizedWeight:
    """A QuantizedWeight holding q's tensors as they are (moved to device if given): a bnb-4bit file's NF4 blocks
    (row_heads: HF q/k rows, see QuantizedWeight) or quantize_nf4's."""
    check_nf4_weight(q)
    tensors = {n: getattr(q, n) if device is None else getattr(q, n).to(device) for n in _NF4_FIELDS}
    return QuantizedWeight("NF4", q.shape, dtype, tensors, q.offset, ops, row_heads=row_heads)


def quantize_weight(w: Tensor, base_quant: str, dtype: torch.dtype, ops: Ops = REFERENCE_OPS) -> QuantizedWeight:
    """Quantize one float weight (out, in) to NF4 or Q8_0 (from its fp32 values), packed on w's device."""
    if base_quant == "nf4":
        return nf4_quantized_weight(quantize_nf4(w), dtype, ops)
    if base_quant == "q8_0":
        if w.dim() != 2 or w.shape[1] % 32:
            raise ValueError(f"q8_0 quantizes rows of whole 32-element blocks; a weight of shape {tuple(w.shape)} "
                             "has none (use nf4, or none)")
        blocks = quantize_q8_0(w)  # (out * in / 32, 34)
        return QuantizedWeight("Q8_0", tuple(w.shape), dtype, {"blocks": blocks.view(w.shape[0], -1)}, ops=ops)
    raise ValueError(f"base_quant {base_quant!r} does not quantize at load (nf4 | q8_0)")


def quantized_at_load(key: str) -> bool:
    """Whether nf4 / q8_0 quantize the checkpoint tensor `key` (a block linear's weight)."""
    parts = key.split(".")
    return len(parts) == 5 and parts[0] == "layers" and parts[3] in QUANTIZED_AT_LOAD and parts[4] == "weight"


def install(model: nn.Module, weights: dict[str, QuantizedWeight]) -> None:
    """Put quantized weights in place of the modules whose `weight` they are (Meta keys `<module>.weight`):
    a linear becomes a QuantLinear, the embedding a QuantEmbedding; a tied output shares the embedding's."""
    for key, qw in weights.items():
        parent, _, attr = key.removesuffix(".weight").rpartition(".")
        holder = model.get_submodule(parent) if parent else model
        if isinstance(getattr(holder, attr), nn.Embedding):
            setattr(holder, attr, QuantEmbedding(qw))
        else:
            setattr(holder, attr, QuantLinear(qw))
    if getattr(model.config, "tie_embeddings", False) and "tok_embeddings.weight" in weights:
        model.output = QuantLinear(weights["tok_embeddings.weight"])


def quantize_model(model: nn.Module, base_quant: str) -> nn.Module:
    """Quantize a float model's block linears in place (nf4 | q8_0), one weight at a time; e.g. a random preset
    for benchmarks. Returns model."""
    if base_quant == "none":
        return model
    weights = {}
    for name, m in list(model.named_modules()):
        key = f"{name}.weight"
        if isinstance(m, nn.Linear) and quantized_at_load(key):
            weights[key] = quantize_weight(m.weight.detach(), base_quant, m.weight.dtype, model.ops)
            m.weight = None  # free the float weight now: peak stays one tensor above the packed model
    install(model, weights)
    return model


def quant_summary(model: nn.Module) -> dict:
    """What the base holds quantized: {format: count}, packed bytes, and the bytes of the float parameters."""
    held = [m for m in model.modules() if isinstance(m, QuantizedWeight)]  # each once, a tied one too
    formats: dict[str, int] = {}
    for m in held:
        formats[m.fmt] = formats.get(m.fmt, 0) + 1
    packed = sum(m.nbytes for m in held)
    seen = {id(p) for m in held for p in m.parameters()}
    dense = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in seen)
    return {"formats": formats, "packed_bytes": packed, "dense_bytes": dense,
            "packed_mib": round(packed / 2**20, 1), "dense_mib": round(dense / 2**20, 1),
            "bits_per_weight": round(8 * packed / max(1, sum(math.prod(m.shape) for m in held)), 3)}
