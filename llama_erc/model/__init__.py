"""The LLaMA family (LLaMA 2, Llama 3.x, SmolLM2) from scratch: config and presets, the model, weight loading
from Meta, HF and GGUF files, and a hand-written LoRA with PEFT's adapter format.

    model = load_pretrained("/models/llama-2-7b-st", dtype=torch.bfloat16, device="cuda")   # load.py
    apply_lora(model, LoRAConfig(rank=8, targets=("wq", "wv")))                            # lora.py
    model.ops = select_ops(triton=True)                                                    # the op set, once
"""
from llama_erc.model.config import MODEL_PRESETS, ModelConfig, from_hf_config, from_meta_params, preset
from llama_erc.model.llama import ACTIVATION_CHECKPOINTING, Transformer
from llama_erc.model.load import LoadError, load_pretrained
from llama_erc.model.lora import LoRAConfig, apply_lora, merge_lora, unmerge_lora
from llama_erc.model.peft import export_peft, import_peft

__all__ = ["ACTIVATION_CHECKPOINTING", "MODEL_PRESETS", "LoadError", "LoRAConfig", "ModelConfig", "Transformer",
           "apply_lora", "export_peft", "from_hf_config", "from_meta_params", "import_peft", "load_pretrained",
           "merge_lora", "preset", "unmerge_lora"]
