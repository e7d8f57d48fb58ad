"""The one model build: base weights -> dtype/device -> op set and activation checkpointing -> LoRA adapters.

Training (engine/train.py), evaluation (engine/eval_run.py), bench.py and the memory benchmark all call
`build_lora_model`, so what a benchmark times is the model users train. The base is a checkpoint (any form
model.load_pretrained reads) or a preset with random N(0, 0.02) weights; the adapters, when `lora` is given,
are the only trainable tensors.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from llama_erc.data import PromptCodec, build_codec, find_tokenizer, load_tokenizer
from llama_erc.engine.memory import choose_checkpointing, free_memory
from llama_erc.engine.runtime import Runtime
from llama_erc.kernels import select_ops
from llama_erc.model import MODEL_PRESETS, LoRAConfig, ModelConfig, Transformer, apply_lora, load_pretrained, preset
from llama_erc.model.quant import quantize_model


def load_codec(model: str, tokenizer: str, prompt_format: str) -> PromptCodec:
    """The run's tokenizer (data.find_tokenizer: --tokenizer, else the checkpoint's own) in its prompt format."""
    return build_codec(load_tokenizer(find_tokenizer(model, tokenizer)), prompt_format)


def build_lora_model(model: str, rt: Runtime, lora: LoRAConfig | None, *, vocab_size: int | None = None,
                     seed: int = 0, activation_checkpointing: str = "none", fused_lora: bool = False,
                     base_quant: str = "none", tokens: int = 0) -> tuple[Transformer, ModelConfig]:
    """(model, its config). `model` is a checkpoint (a directory or a .gguf file) or a preset name, whose
    vocabulary then comes from the tokenizer (`vocab_size`); its random weights are drawn with `seed`. The op
    set follows rt.use_kernels (Triton) and `fused_lora` (the one-node LoRA linear). `base_quant` holds the
    frozen base quantized (model/quant.py; a preset's random weights are quantized after they are drawn). With
    `lora`, adapters are applied (their init drawn from `seed` too) and are the only trainable tensors;
    without, the base alone. activation_checkpointing "auto" is resolved once the weights are in memory, for
    micro-batches of `tokens` tokens (engine/memory.py; printed on the main process): read the choice from
    the model's activation_checkpointing."""
    if Path(model).is_dir() or Path(model).suffix.lower() == ".gguf":
        net = load_pretrained(model, dtype=rt.dtype, device=rt.device, base_quant=base_quant)
        mcfg = net.config
    elif model in MODEL_PRESETS:
        mcfg = preset(model)
        if vocab_size is not None:
            mcfg = replace(mcfg, vocab_size=vocab_size)
        with torch.device("meta"):
            net = Transformer(mcfg)
        net.to_empty(device=rt.device)
        net.to(rt.dtype)
        net.tie_weights()  # to_empty gave the tied output its own storage
        net.init_weights(generator=torch.Generator(rt.device).manual_seed(seed))
        if base_quant == "gguf":
            raise ValueError(f"--base_quant gguf keeps a GGUF file's blocks; --model {model!r} is a preset (random "
                             "weights): use nf4 or q8_0")
        quantize_model(net, base_quant)
    else:
        raise ValueError(f"--model {model!r} is neither a checkpoint (a directory or a .gguf file) nor a preset "
                         f"({', '.join(MODEL_PRESETS)})")
    if vocab_size is not None and vocab_size > mcfg.vocab_size:
        raise ValueError(f"the tokenizer has {vocab_size} pieces but the model's vocabulary is {mcfg.vocab_size}")
    if activation_checkpointing == "auto":
        activation_checkpointing, why = choose_checkpointing(mcfg, rt.dtype, lora, tokens, free_memory(rt.device),
                                                             eager=not (rt.use_kernels and fused_lora))
        if rt.is_main:
            print(f"activation checkpointing: {why}", flush=True)
    net.activation_checkpointing = activation_checkpointing
    if lora is not None:
        torch.manual_seed(seed)  # adapter init (kaiming A) is seeded independently of the base weights
        apply_lora(net, lora, verbose=rt.is_main)
    net.ops = select_ops(triton=rt.use_kernels, fused_lora=fused_lora)
    return net, mcfg
