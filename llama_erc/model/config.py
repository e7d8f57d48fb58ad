"""Model architecture config: a frozen dataclass, presets, and builders from Meta params.json / HF config.json.

The LLaMA family this engine runs: LLaMA 2, Llama 3.x (Llama 3 rotary scaling, tied embeddings for 3.2 1B/3B)
and SmolLM2 (tied embeddings). What is not exactly that architecture (other rotary scalings, biases, a head
size other than dim / n_heads) is refused with an error naming the key and value, never approximated.
"""
from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class ModelConfig:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    hidden_dim: int = 11008  # stored explicitly; the multiple_of arithmetic runs once, in meta_hidden_dim
    vocab_size: int = 32000
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    # Llama 3 rotary scaling (Meta's use_scaled_rope; HF rope_type "llama3"); "default" = LLaMA 2's plain rotary.
    # The llama3 fields are read only when rope_type == "llama3" (model/rope.py has the formula).
    rope_type: str = "default"
    rope_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_seq_len: int = 8192
    tie_embeddings: bool = False  # output projection is the token embedding (one tensor; SmolLM2, Llama 3.2 1B/3B)

    def __post_init__(self) -> None:
        for f in ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "vocab_size", "max_seq_len"):
            if getattr(self, f) <= 0:
                raise ValueError(f"ModelConfig.{f} must be positive, got {getattr(self, f)}")
        if self.dim % self.n_heads:
            raise ValueError(f"ModelConfig: dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"ModelConfig: n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig: head_dim {self.head_dim} must be even for rotary embeddings")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"ModelConfig: rope_type {self.rope_type!r} unsupported; valid: {', '.join(ROPE_TYPES)}")
        if self.rope_type == "llama3":
            if self.rope_factor <= 0 or self.rope_original_max_seq_len <= 0:
                raise ValueError(f"ModelConfig: llama3 rope_factor {self.rope_factor} and rope_original_max_seq_len "
                                 f"{self.rope_original_max_seq_len} must be positive")
            if not 0 < self.rope_low_freq_factor < self.rope_high_freq_factor:
                raise ValueError(f"ModelConfig: llama3 rotary needs 0 < low_freq_factor < high_freq_factor, got "
                                 f"{self.rope_low_freq_factor}, {self.rope_high_freq_factor}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def n_params(self) -> int:
        """Parameter count (embeddings and output counted once when tied)."""
        kv = self.n_kv_heads * self.head_dim
        attn = self.dim * (2 * self.dim + 2 * kv)
        ffn = 3 * self.dim * self.hidden_dim
        n_vocab_mats = 1 if self.tie_embeddings else 2
        return self.n_layers * (attn + ffn + 2 * self.dim) + self.dim + n_vocab_mats * self.vocab_size * self.dim


def meta_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's FeedForward sizing: 2/3 of 4*dim, scaled, rounded up to a multiple of `multiple_of`."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


ROPE_TYPES = ("default", "llama3")
_LLAMA3 = dict(rope_theta=500000.0, rope_type="llama3", rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
               rope_original_max_seq_len=8192, max_seq_len=131072, vocab_size=128256, n_kv_heads=8)

MODEL_PRESETS: dict[str, ModelConfig] = {
    "llama-2-7b": ModelConfig(),
    "llama-2-13b": ModelConfig(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, hidden_dim=13824),
    "llama-2-70b": ModelConfig(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                               hidden_dim=meta_hidden_dim(8192, 4096, 1.3)),  # 28672
    "llama-3.1-8b": ModelConfig(dim=4096, n_layers=32, n_heads=32, hidden_dim=14336, rope_factor=8.0, **_LLAMA3),
    "llama-3.2-1b": ModelConfig(dim=2048, n_layers=16, n_heads=32, hidden_dim=8192, rope_factor=32.0,
                                tie_embeddings=True, **_LLAMA3),
    "llama-3.2-3b": ModelConfig(dim=3072, n_layers=28, n_heads=24, hidden_dim=8192, rope_factor=32.0,
                                tie_embeddings=True, **_LLAMA3),
    "smollm2-135m": ModelConfig(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536, vocab_size=49152,
                                rope_theta=100000.0, max_seq_len=8192, tie_embeddings=True),
    "tiny": ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=176, vocab_size=512,
                        max_seq_len=256),
}


def preset(name: str) -> ModelConfig:
    if name not in MODEL_PRESETS:
        raise ValueError(f"unknown model preset {name!r}; valid: {', '.join(MODEL_PRESETS)}")
    return MODEL_PRESETS[name]


def from_meta_params(params: dict, vocab_size: int | None = None, source: str = "params.json",
                     has_output: bool = True) -> ModelConfig:
    """Build from Meta's params.json. vocab_size -1 there means "from the tokenizer": pass it in.

    Llama 3.x: `use_scaled_rope: true` is Meta's Llama 3 rotary scaling; the factor is `rope_scaling_factor`
    (Meta's reference default 8, Llama 3.1), with `low_freq_factor`, `high_freq_factor` and
    `original_max_position_embeddings` when present. Tied embeddings: `tie_embeddings` (what engine/convert.py
    writes), or a checkpoint without `output.weight` (has_output=False).
    """
    try:
        dim, n_layers, n_heads = int(params["dim"]), int(params["n_layers"]), int(params["n_heads"])
    except KeyError as e:
        raise ValueError(f"{source}: missing required key {e.args[0]!r}") from None
    vocab = int(params.get("vocab_size", -1))
    if vocab <= 0:
        if vocab_size is None:
            raise ValueError(f"{source}: vocab_size is {vocab} (from the tokenizer) and no vocab size was given")
        vocab = vocab_size
    if "hidden_dim" in params:  # written by engine/convert.py for sizes multiple_of cannot express
        hidden = int(params["hidden_dim"])
    else:
        hidden = meta_hidden_dim(dim, int(params.get("multiple_of", 256)), params.get("ffn_dim_multiplier"))
    rope: dict = {}
    if params.get("use_scaled_rope"):
        rope = dict(rope_type="llama3", rope_factor=float(params.get("rope_scaling_factor") or 8.0),
                    rope_low_freq_factor=float(params.get("low_freq_factor", 1.0)),
                    rope_high_freq_factor=float(params.get("high_freq_factor", 4.0)),
                    rope_original_max_seq_len=int(params.get("original_max_position_embeddings", 8192)))
    tie = bool(params.get("tie_embeddings", False)) or not has_output
    return ModelConfig(dim=dim, n_layers=n_layers, n_heads=n_heads,
                       n_kv_heads=int(params.get("n_kv_heads") or n_heads), hidden_dim=hidden,
                       vocab_size=vocab, norm_eps=float(params.get("norm_eps", 1e-5)),
                       rope_theta=float(params.get("rope_theta", 10000.0)),
                       max_seq_len=int(params.get("max_seq_len", 4096)), tie_embeddings=tie, **rope)


def hf_rope_fields(cfg: dict, source: str) -> dict:
    """ModelConfig rotary fields from an HF config: `rope_scaling` (transformers < 5) or `rope_parameters` (>= 5).
    Only the Llama 3 scaling is the architecture we run; linear, dynamic, yarn, longrope ... are refused."""
    scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    key = "rope_scaling" if cfg.get("rope_scaling") else "rope_parameters"
    if not isinstance(scaling, dict):
        raise ValueError(f"{source}: {key} must be an object, got {scaling!r}")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return {}
    if rope_type != "llama3":
        raise ValueError(f"{source}: {key}.rope_type {rope_type!r} is unsupported (supported: default, llama3)")
    try:
        return dict(rope_type="llama3", rope_factor=float(scaling["factor"]),
                    rope_low_freq_factor=float(scaling["low_freq_factor"]),
                    rope_high_freq_factor=float(scaling["high_freq_factor"]),
                    rope_original_max_seq_len=int(scaling["original_max_position_embeddings"]))
    except KeyError as e:
        raise ValueError(f"{source}: {key} (llama3) is missing {e.args[0]!r}") from None


def from_hf_config(cfg: dict, source: str = "config.json") -> ModelConfig:
    """Build from a Hugging Face LlamaForCausalLM config.json (LLaMA 2, Llama 3.x, SmolLM2)."""
    try:
        dim, n_heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        kw = dict(dim=dim, n_layers=int(cfg["num_hidden_layers"]), n_heads=n_heads,
                  hidden_dim=int(cfg["intermediate_size"]), vocab_size=int(cfg["vocab_size"]))
    except KeyError as e:
        raise ValueError(f"{source}: missing required key {e.args[0]!r}") from None
    if cfg.get("head_dim") not in (None, dim // n_heads):
        raise ValueError(f"{source}: head_dim {cfg['head_dim']} != hidden_size / num_attention_heads "
                         f"({dim // n_heads}); unsupported")
    for bias in ("attention_bias", "mlp_bias"):
        if cfg.get(bias):
            raise ValueError(f"{source}: {bias}={cfg[bias]} is unsupported (LLaMA linears have no bias)")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{source}: hidden_act {act!r} is unsupported (LLaMA's SwiGLU uses silu)")
    theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta") or 10000.0
    return ModelConfig(**kw, n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
                       norm_eps=float(cfg.get("rms_norm_eps", 1e-5)), rope_theta=float(theta),
                       max_seq_len=int(cfg.get("max_position_embeddings", 4096)),
                       tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), **hf_rope_fields(cfg, source))


def to_meta_params(cfg: ModelConfig) -> dict:
    """params.json content that rebuilds exactly `cfg` (hidden_dim stored too, for non-Meta sizes)."""
    out = {"dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads,
           "vocab_size": cfg.vocab_size, "norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
           "max_seq_len": cfg.max_seq_len, "hidden_dim": cfg.hidden_dim}
    if cfg.rope_type == "llama3":  # Meta's own keys, so Meta's reference code reads it too
        out.update(use_scaled_rope=True, rope_scaling_factor=cfg.rope_factor, low_freq_factor=cfg.rope_low_freq_factor,
                   high_freq_factor=cfg.rope_high_freq_factor,
                   original_max_position_embeddings=cfg.rope_original_max_seq_len)
    if cfg.tie_embeddings:
        out["tie_embeddings"] = True
    return out


def config_fields() -> tuple[str, ...]:
    return tuple(f.name for f in fields(ModelConfig))
