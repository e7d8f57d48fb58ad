"""Packaging for the LLaMA 2 LoRA engine.

Runtime dependencies are exactly the seven the design allows. transformers and peft are
test/benchmark references only (extra `test`); the engine never imports them.
torch is pinned as `torch>=2.5` (SDPA with enable_gqa); on the CPU dev machines the Makefile
installs the local CPU wheel torch==2.13.0 first so pip never pulls the CUDA build.
"""
from setuptools import setup

setup(
    name="llama-lora-erc",
    version="0.1.0",
    description="From-scratch LLaMA 2 LoRA fine-tuning engine with Triton kernels, for emotion recognition in conversations",
    python_requires=">=3.10",
    packages=["engine", "kernels", "model", "data", "benchmarks"],
    py_modules=["train", "eval", "bench"],
    install_requires=[
        "torch>=2.5",
        "sentencepiece>=0.2",
        "safetensors>=0.8",  # zero-copy mmap views and pread-backed loads were verified on 0.8
        "numpy>=1.24",
        "triton>=3.0",
        "einops>=0.7",
        "scikit-learn>=1.3",
    ],
    extras_require={"test": ["pytest>=8", "transformers>=4.45", "peft>=0.13", "psutil>=5"],
                    # tokenizer.json, Llama 3's tiktoken tokenizer.model and GGUF checkpoints (data/tokenizer.py)
                    "formats": ["gguf", "tokenizers", "tiktoken"]},
    entry_points={"console_scripts": ["llama-erc-train=train:main", "llama-erc-eval=eval:main"]},
)
