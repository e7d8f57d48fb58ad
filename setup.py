"""Packaging for the LLaMA-family LoRA engine: one import package, `llama_erc`, and three console scripts.

Nothing else goes into site-packages: the design's rooms (engine, kernels, model, data, benchmarks) are
subpackages of llama_erc, so no generic top-level name clashes with another distribution (Hugging Face's
`kernels`, a dependency of transformers since 5.25, owns that import name). train.py, eval.py and bench.py at
the repository root are the same entry points for a checkout.

Runtime dependencies are exactly the seven the design allows. transformers and peft are test/benchmark
references only (extra `test`); the engine never imports them. gguf, tokenizers and tiktoken are optional,
one extra each, imported only when such a file is opened. torch is required as `torch>=2.5` (SDPA with
enable_gqa); on the CPU dev machines the Makefile installs the local CPU wheel torch==2.13.0 first so pip never
pulls the CUDA build.
"""
from setuptools import find_packages, setup

setup(
    name="llama-lora-erc",
    version="0.2.0",
    description="From-scratch LoRA fine-tuning engine for the LLaMA family, with Triton kernels, for emotion "
                "recognition in conversations",
    python_requires=">=3.10",
    packages=find_packages(include=["llama_erc", "llama_erc.*"]),
    package_data={"llama_erc.demo": ["meld_format/*.csv"]},
    install_requires=[
        "torch>=2.5",
        "sentencepiece>=0.2",
        "safetensors>=0.8",  # zero-copy mmap views and pread-backed loads were verified on 0.8
        "numpy>=1.24",
        "triton>=3.0",
        "einops>=0.7",
        "scikit-learn>=1.3",
    ],
    extras_require={
        "test": ["pytest>=8", "transformers>=4.45", "peft>=0.13", "psutil>=5"],
        "gguf": ["gguf"],              # GGUF checkpoints and their embedded vocabularies
        "tokenizers": ["tokenizers"],  # HF tokenizer.json (and GGUF vocabularies, rebuilt as one)
        "tiktoken": ["tiktoken"],      # Meta's Llama 3 tokenizer.model
    },
    entry_points={"console_scripts": ["llama-erc-train=llama_erc.engine.train:main",
                                      "llama-erc-eval=llama_erc.engine.eval_run:main",
                                      "llama-erc-bench=llama_erc.benchmarks.bench:main"]},
)
