"""Model architecture config: a frozen dataclass, presets, and builders from Meta params.json / HF config.json."""
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

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def n_params(self) -> int:
        """Parameter count (embeddings and output counted separately; Meta does not tie them)."""
        kv = self.n_kv_heads * self.head_dim
        attn = self.dim * (2 * self.dim + 2 * kv)
        ffn = 3 * self.dim * self.hidden_dim
        return self.n_layers * (attn + ffn + 2 * self.dim) + self.dim + 2 * self.vocab_size * self.dim


def meta_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's FeedForward sizing: 2/3 of 4*dim, scaled, rounded up to a multiple of `multiple_of`."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


MODEL_PRESETS: dict[str, ModelConfig] = {
    "llama-2-7b": ModelConfig(),
    "llama-2-13b": ModelConfig(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, hidden_dim=13824),
    "llama-2-70b": ModelConfig(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                               hidden_dim=meta_hidden_dim(8192, 4096, 1.3)),  # 28672
    "tiny": ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=176, vocab_size=512,
                        max_seq_len=256),
}


def preset(name: str) -> ModelConfig:
    if name not in MODEL_PRESETS:
        raise ValueError(f"unknown model preset {name!r}; valid: {', '.join(MODEL_PRESETS)}")
    return MODEL_PRESETS[name]


def from_meta_params(params: dict, vocab_size: int | None = None, source: str = "params.json") -> ModelConfig:
    """Build from Meta's params.json. vocab_size -1 there means "from the tokenizer": pass it in."""
    try:
        dim, n_layers, n_heads = int(params["dim"]), int(params["n_layers"]), int(params["n_heads"])
    except KeyError as e:
        raise ValueError(f"{source}: missing required key {e.args[0]!r}") from None
    vocab = int(params.get("vocab_size", -1))
    if vocab <= 0:
        if vocab_size is None:
            raise ValueError(f"{source}: vocab_size is {vocab} (from the tokenizer) and no vocab size was given")
        vocab = vocab_size
    if "hidden_dim" in params:  # written by model.convert for sizes multiple_of cannot express
        hidden = int(params["hidden_dim"])
    else:
        hidden = meta_hidden_dim(dim, int(params.get("multiple_of", 256)), params.get("ffn_dim_multiplier"))
    return ModelConfig(dim=dim, n_layers=n_layers, n_heads=n_heads,
                       n_kv_heads=int(params.get("n_kv_heads") or n_heads), hidden_dim=hidden,
                       vocab_size=vocab, norm_eps=float(params.get("norm_eps", 1e-5)),
                       rope_theta=float(params.get("rope_theta", 10000.0)),
                       max_seq_len=int(params.get("max_seq_len", 4096)))


def from_hf_config(cfg: dict, source: str = "config.json") -> ModelConfig:
    """Build from a Hugging Face LlamaForCausalLM config.json."""
    try:
        dim, n_heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        kw = dict(dim=dim, n_layers=int(cfg["num_hidden_layers"]), n_heads=n_heads,
                  hidden_dim=int(cfg["intermediate_size"]), vocab_size=int(cfg["vocab_size"]))
    except KeyError as e:
        raise ValueError(f"{source}: missing required key {e.args[0]!r}") from None
    if cfg.get("head_dim") not in (None, dim // n_heads):
        raise ValueError(f"{source}: head_dim {cfg['head_dim']} != hidden_size / num_attention_heads; unsupported")
    rope_type = (cfg.get("rope_parameters") or {}).get("rope_type", "default")
    if cfg.get("rope_scaling") or rope_type != "default":
        raise ValueError(f"{source}: rope scaling ({cfg.get('rope_scaling') or rope_type}) is not LLaMA 2; unsupported")
    if cfg.get("tie_word_embeddings"):
        raise ValueError(f"{source}: tie_word_embeddings=true is not LLaMA 2; unsupported")
    theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta") or 10000.0
    return ModelConfig(**kw, n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
                       norm_eps=float(cfg.get("rms_norm_eps", 1e-5)), rope_theta=float(theta),
                       max_seq_len=int(cfg.get("max_position_embeddings", 4096)))


def to_meta_params(cfg: ModelConfig) -> dict:
    """params.json content that rebuilds exactly `cfg` (hidden_dim stored too, for non-Meta sizes)."""
    return {"dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads,
            "vocab_size": cfg.vocab_size, "norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
            "max_seq_len": cfg.max_seq_len, "hidden_dim": cfg.hidden_dim}


def config_fields() -> tuple[str, ...]:
    return tuple(f.name for f in fields(ModelConfig))
