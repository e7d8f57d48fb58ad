"""From-scratch LLaMA 2: config, model, checkpoint loading (Meta and HF layouts), LoRA."""
from .config import MODEL_PRESETS, ModelConfig, from_hf_config, from_meta_params, preset
from .llama import Transformer

__all__ = ["MODEL_PRESETS", "ModelConfig", "Transformer", "from_hf_config", "from_meta_params", "preset"]
