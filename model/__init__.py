"""From-scratch LLaMA 2: config, model, checkpoint loading (Meta and HF layouts), LoRA."""
from .config import MODEL_PRESETS, ModelConfig, from_hf_config, from_meta_params, preset
from .checkpoint import CheckpointError, load_pretrained
from .llama import Transformer
from .lora import LoRAConfig, apply_lora, merge_lora, unmerge_lora
from .lora_peft import export_peft, import_peft

__all__ = ["MODEL_PRESETS", "CheckpointError", "LoRAConfig", "ModelConfig", "Transformer", "apply_lora",
           "export_peft", "from_hf_config", "from_meta_params", "import_peft", "load_pretrained", "merge_lora",
           "preset", "unmerge_lora"]
