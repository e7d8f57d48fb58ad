"""The LLaMA family (LLaMA 2, Llama 3.x, SmolLM2) written from scratch, with Meta's module names so Meta
checkpoints load as they are.

    h = tok_embeddings(tokens)                                   (B, T, D)
    for each block:  h = h + wo(attn(rope(wq(n1)), rope(wk(n1)), wv(n1)))      n1 = attention_norm(h)
                     h = h + w2(silu(w1(n2)) * w3(n2))                        n2 = ffn_norm(h)
                     (the first add and ffn_norm are one op, ops.add_rms_norm, returning (h, n2))
    logits = output(norm(h))                                     (B, T, V)

Llama 3 differs only in its rotary frequencies (model/rope.py); tied models (SmolLM2, Llama 3.2 1B/3B) use the
token embedding as the output projection: `output.weight` IS `tok_embeddings.weight`, one tensor.

Rotary embeddings use Meta's interleaved pairs (x[2i], x[2i+1]) with fp32 cos/sin (checkpoints in HF's
rotate-half order are un-permuted at load time, model/forms.py). Attention is SDPA with GQA: causal, or under a caller's
bool mask (packed examples, label-restricted decoding); or flex_attention under a caller's BlockMask (packed
examples: whole tiles outside every example are skipped rather than computed and masked).
The fused ops (RMSNorm, residual add + RMSNorm, SwiGLU, RoPE, the LoRA linear) come from one op set,
`Transformer.ops` (kernels.select_ops: the fused ops or their pure-torch twins, which compute the same function),
chosen once per model; no module takes a backend flag in its forward.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from llama_erc.kernels import REFERENCE_OPS, Ops, in_place_safe
from llama_erc.model.config import ModelConfig
from llama_erc.model.recompute import block_recompute
from llama_erc.model.rope import rope_cos_sin


ACTIVATION_CHECKPOINTING = ("none", "full", "selective", "block")  # per transformer block

# What selective checkpointing keeps: the outputs of the matmuls and of attention, the ops whose recomputation
# costs FLOPs. Everything else in a block (norms, rotary, SwiGLU, dropout, casts, adds) is recomputed in
# backward from them, which costs a pass over memory, not a GEMM. Names that a torch build lacks are skipped.
_aten = torch.ops.aten
_KEPT_OPS = frozenset(getattr(getattr(_aten, name), "default") for name in (
    "mm", "addmm", "bmm", "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")
    if hasattr(_aten, name))


def _keep_matmul_outputs(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _KEPT_OPS else CheckpointPolicy.PREFER_RECOMPUTE


@functools.cache
def _compiled_flex_attention():
    """flex_attention compiled into fused kernels, once per process. torch.compile generalises to dynamic shapes
    after the first change of row length, so varying packed-row lengths do not recompile every step."""
    return torch.compile(flex_attention)


def _flex(q: Tensor, k: Tensor, v: Tensor, block_mask: BlockMask, enable_gqa: bool) -> Tensor:
    """Fused flex_attention on CUDA; the eager call (the unfused reference that materialises the scores) on
    other devices, and inside a block that is itself being compiled, where the enclosing graph fuses it."""
    fn = flex_attention if torch.compiler.is_compiling() or not q.is_cuda else _compiled_flex_attention()
    return fn(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)


def _positions(tokens: Tensor, positions: Tensor | None, start: int) -> Tensor:
    """hidden_states' positions: start..start+T-1 by default, else checked against tokens (B, T)."""
    T = tokens.shape[1]
    if positions is None:
        return torch.arange(start, start + T, device=tokens.device)
    if positions.shape[-1] != T or positions.dim() not in (1, 2):
        raise ValueError(f"positions shape {tuple(positions.shape)} does not match tokens {tuple(tokens.shape)}")
    return positions


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, ops: Ops = REFERENCE_OPS):
        super().__init__()
        self.eps, self.ops = eps, ops
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: Ops = REFERENCE_OPS):
        super().__init__()
        self.ops = ops
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | BlockMask | None = None,
                prefix: tuple[Tensor, Tensor] | None = None, record: list | None = None) -> Tensor:
        """prefix (inference): keys and values (1, Hkv, P, Dh) of tokens every row sees before its own, put in
        front of the row's keys (mask is then bool (B, 1, T, P + T)). record: a list the rotated keys and the
        values (B, Hkv, T, Dh) are appended to (Transformer.encode_prefix)."""
        B, T, _ = x.shape
        # q and k rotated by one launch, in place into the projections' outputs (dead otherwise), unless
        # checkpointing keeps those outputs for its recomputation: "selective" through a dispatch mode, which
        # in_place_safe() sees; "block" swaps the op set's `<op>_` fields for the out-of-place ops (recompute.py)
        rope_qk = self.ops.apply_rope_qk_ if in_place_safe() else self.ops.apply_rope_qk
        q, k = rope_qk(self.wq(x).view(B, T, self.n_heads, self.head_dim),  # (B, T, H, Dh)
                       self.wk(x).view(B, T, self.n_kv_heads, self.head_dim), cos, sin)  # (B, T, Hkv, Dh)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, Hkv, Dh)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H|Hkv, T, Dh)
        if record is not None:
            record.append((k, v))
        if prefix is not None:  # (1, Hkv, P, Dh) in front of every row's own: (B, Hkv, P + T, Dh)
            k, v = (torch.cat([p.expand(B, -1, -1, -1), t], dim=2) for p, t in zip(prefix, (k, v)))
        gqa = self.n_kv_heads != self.n_heads
        if isinstance(mask, BlockMask):  # the same "query may see key" rule as a bool mask, tile-sparse
            o = _flex(q, k, v, mask, gqa)  # (B, H, T, Dh)
        else:
            # mask None: plain causal attention; else a bool (B, 1, T, T) "query may see key" mask, which
            # confines attention to each packed example or scores several continuations of one prompt at once
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                               enable_gqa=gqa)  # (B, H, T, Dh)
        return self.wo(o.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: Ops = REFERENCE_OPS):
        super().__init__()
        self.ops = ops
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)  # down
        self.w3 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)  # up

    def forward(self, x: Tensor) -> Tensor:
        # the backward may write over w1's and w3's outputs (read by nothing else) unless checkpointing keeps
        # them (as for the rotary above)
        swiglu = self.ops.swiglu_ if in_place_safe() else self.ops.swiglu
        return self.w2(swiglu(self.w1(x), self.w3(x)))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: Ops = REFERENCE_OPS):
        super().__init__()
        self.ops = ops
        self.attention = Attention(cfg, ops)
        self.feed_forward = FeedForward(cfg, ops)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps, ops)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps, ops)

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | BlockMask | None = None,
                prefix: tuple[Tensor, Tensor] | None = None, record: list | None = None) -> Tensor:
        h_attn = self.attention(self.attention_norm(h), cos, sin, mask, prefix, record)
        # the residual add and ffn_norm in one op (one pass over memory with the fused kernel); ffn_norm keeps its
        # parameter, so checkpoints load as before, but its forward is not called (nor hooks on it)
        h, n2 = self.ops.add_rms_norm(h_attn, h, self.ffn_norm.weight, self.ffn_norm.eps)
        return h + self.feed_forward(n2)


class Transformer(nn.Module):
    """A LLaMA-family decoder. `ops` is the op set every module calls (kernels.select_ops), chosen once;
    `activation_checkpointing` (ACTIVATION_CHECKPOINTING; True/False mean full/none): "full" keeps only each
    block's input and recomputes the block in backward; "selective" also keeps the block's matmul and attention
    outputs and recomputes only the cheap ops between them; "block" keeps the block's input and its frozen GEMMs'
    outputs and recomputes the rest with one autograd node per block (model/recompute.py)."""

    def __init__(self, cfg: ModelConfig, *, ops: Ops = REFERENCE_OPS, activation_checkpointing: bool | str = "none"):
        super().__init__()
        self.config = cfg
        self.activation_checkpointing = activation_checkpointing
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg, ops) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, ops)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.ops = ops
        self.tie_weights()

    def tie_weights(self) -> None:
        """Tied configs: make output.weight the embedding Parameter itself. Call again after anything that
        replaces parameters (to_empty, load_state_dict(assign=True)), which would otherwise split the two."""
        if self.config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    @property
    def ops(self) -> Ops:
        return self._ops

    @ops.setter
    def ops(self, ops: Ops) -> None:
        """Switch every module, LoRA layers included, to `ops` (all of a model runs one op set)."""
        self._ops = ops
        for m in self.modules():
            if m is not self and hasattr(m, "ops"):
                m.ops = ops

    @property
    def activation_checkpointing(self) -> str:
        return self._activation_checkpointing

    @activation_checkpointing.setter
    def activation_checkpointing(self, mode: bool | str) -> None:
        mode = ("full" if mode else "none") if isinstance(mode, bool) else mode
        if mode not in ACTIVATION_CHECKPOINTING:
            raise ValueError(f"activation_checkpointing must be one of {', '.join(ACTIVATION_CHECKPOINTING)} "
                             f"(or a bool), got {mode!r}")
        self._activation_checkpointing = mode

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Random init for training from scratch or benchmarking: N(0, std) matrices, unit norm weights.

        Works after `to_empty()` of a meta-built model, on any device and dtype.
        """
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif not name.endswith(("lora_a", "lora_b")):  # adapters have their own init
                p.normal_(0.0, std, generator=generator)

    @torch.no_grad()
    def encode_prefix(self, tokens: Tensor) -> list[tuple[Tensor, Tensor]]:
        """tokens (1, P) at positions 0..P-1 -> per layer its rotated keys and values (1, Hkv, P, Dh): a prefix
        that many rows share (label scoring's instruction), computed once and passed to hidden_states(prefix=)."""
        if tokens.dim() != 2 or tokens.shape[0] != 1 or tokens.shape[1] == 0:
            raise ValueError(f"encode_prefix takes one non-empty row of tokens (1, P), got {tuple(tokens.shape)}")
        cos, sin = rope_cos_sin(torch.arange(tokens.shape[1], device=tokens.device), self.config)
        h, kv = self.tok_embeddings(tokens), []
        for layer in self.layers:
            h = layer(h, cos, sin, None, None, kv)
        return kv

    def hidden_states(self, tokens: Tensor, positions: Tensor | None = None,
                      mask: Tensor | BlockMask | None = None,
                      prefix: list[tuple[Tensor, Tensor]] | None = None) -> Tensor:
        """tokens: (B, T) -> final normed hidden states (B, T, D), before the vocabulary projection.

        positions: (T,) or (B, T) integer positions (default arange(T)); per-row positions serve packed rows.
        mask: optional bool (B, T, T), True where query t may attend to key s; or a flex_attention BlockMask of
        batch B (or 1) over T x T that encodes the same rule; default causal. flex_attention has a backward
        on CUDA only (torch 2.13), so a BlockMask trains on CUDA and runs inference anywhere.
        prefix (inference only): encode_prefix's keys and values of P tokens every row sees first; the mask is
        then bool (B, T, P + T) over [prefix keys, own keys] (default: the whole prefix, then causal), and
        positions (default P..P+T-1) continue after the prefix.
        """
        B, T = tokens.shape
        if prefix is not None:
            return self._hidden_states_after(tokens, positions, mask, prefix)
        positions = _positions(tokens, positions, 0)
        if isinstance(mask, BlockMask):
            if mask.shape[0] not in (1, B) or tuple(mask.seq_lengths) != (T, T):
                raise ValueError(f"BlockMask of batch {mask.shape[0]} over {tuple(mask.seq_lengths)} does not "
                                 f"match tokens {(B, T)}")
        elif mask is not None:
            if mask.shape != (B, T, T) or mask.dtype != torch.bool:
                raise ValueError(f"mask must be bool (B, T, T) = {(B, T, T)}, got {mask.dtype} {tuple(mask.shape)}")
            mask = mask[:, None]  # (B, 1, T, T): shared by all heads
        cos, sin = rope_cos_sin(positions, self.config)  # (T | B T, Dh/2) fp32
        h = self.tok_embeddings(tokens)  # (B, T, D)
        selective = {"context_fn": functools.partial(create_selective_checkpoint_contexts, _keep_matmul_outputs)}
        for layer in self.layers:
            if self.activation_checkpointing == "block":
                h = block_recompute(layer, h, cos, sin, mask)
            elif self.activation_checkpointing != "none" and torch.is_grad_enabled():
                # non-reentrant: works with frozen inputs and keeps autograd hooks exact; the RNG state is
                # replayed, so recomputed dropout draws the same masks
                h = checkpoint(layer, h, cos, sin, mask, use_reentrant=False,
                               **(selective if self.activation_checkpointing == "selective" else {}))
            else:
                h = layer(h, cos, sin, mask)
        return self.norm(h)

    def _hidden_states_after(self, tokens: Tensor, positions: Tensor | None, mask: Tensor | None,
                             prefix: list[tuple[Tensor, Tensor]]) -> Tensor:
        """hidden_states with a cached prefix: every layer called plainly (no checkpointing: no backward here)."""
        if torch.is_grad_enabled():
            raise ValueError("hidden_states(prefix=) is for inference: run it under torch.no_grad()")
        B, T = tokens.shape
        if len(prefix) != len(self.layers):
            raise ValueError(f"prefix holds {len(prefix)} layers' keys and values, the model has {len(self.layers)}")
        P = prefix[0][0].shape[2]
        positions = _positions(tokens, positions, P)
        if mask is None:  # the whole prefix, then causal over the row's own tokens
            own = torch.ones(T, T, dtype=torch.bool, device=tokens.device).tril()
            mask = torch.cat([own.new_ones(T, P), own], dim=1).expand(B, T, P + T)
        elif isinstance(mask, BlockMask) or mask.shape != (B, T, P + T) or mask.dtype != torch.bool:
            raise ValueError(f"with a prefix of {P} tokens the mask must be bool (B, T, P + T) = {(B, T, P + T)}, "
                             f"got {getattr(mask, 'dtype', type(mask).__name__)} {tuple(mask.shape)}")
        cos, sin = rope_cos_sin(positions, self.config)  # (T | B T, Dh/2) fp32
        h = self.tok_embeddings(tokens)  # (B, T, D)
        for layer, kv in zip(self.layers, prefix):
            h = layer(h, cos, sin, mask[:, None], kv)  # mask (B, 1, T, P + T): shared by all heads
        return self.norm(h)

    def forward(self, tokens: Tensor, positions: Tensor | None = None,
                mask: Tensor | BlockMask | None = None) -> Tensor:
        """tokens: (B, T) int -> logits (B, T, vocab) in the weights' dtype."""
        return self.output(self.hidden_states(tokens, positions, mask))
