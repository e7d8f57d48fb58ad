"""Validated loading of pretrained LLaMA-family weights into our Transformer, from any of four forms.

Forms (detected from the directory; readers in model/forms.py):
    1. params.json + Meta-named *.safetensors (+ model.safetensors.index.json): what engine/convert.py writes;
       the zero-copy path.
    2. params.json + consolidated.NN.pth: Meta's download; model-parallel shards joined per tensor.
    3. config.json + HF-named model*.safetensors (+ index): renamed, wq/wk un-permuted to Meta's rotary order.
    4. a GGUF file (or a directory holding one): llama.cpp's format, dequantized tensor by tensor (model/gguf.py).
A Meta params.json with vocab_size -1 ("from the tokenizer") takes the vocabulary from tok_embeddings' rows.

Memory: the model is built on the meta device (no storage), every tensor is fetched, cast to dtype/device
and put in the state dict one at a time, then load_state_dict(assign=True) adopts those tensors as the
parameters: no second copy of the weights ever exists. On CPU with dtype equal to the file's, safetensors
tensors that need no re-layout are zero-copy: parameters are copy-on-write views of the memory-mapped
files, paged in when first used (so do not truncate or rewrite those files in place while the model
lives; replacing them is fine). Anything converted is read with pread into owned memory first, so file
pages do not stay resident beside the converted copy (details in model/forms.py).
Measured (benchmarks/load_rss.py, 1.06B params, bf16 form 1): peak RSS 1.04x the weights' bytes.

Every check (keys, shapes, config vs tensors, file integrity) runs on JSON and tensor headers before any
weight byte is read; a failure raises LoadError naming the file or key, never a partial load.
"""
from __future__ import annotations

from itertools import chain
from pathlib import Path

import torch
from torch import nn

from llama_erc.kernels import REFERENCE_OPS, Ops
from llama_erc.model.forms import FORMS, WeightSource, LoadError, _listing, detect_form, open_weights
from llama_erc.model.llama import Transformer

__all__ = ["FORMS", "LoadError", "WeightSource", "check_against_model", "weight_keys", "detect_form", "load_pretrained",
           "open_weights"]


def weight_keys(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """The tensors a checkpoint of `model` holds, with shapes: its state dict, less `output.weight` when the
    output projection is tied to the embedding (stored once, as tok_embeddings.weight)."""
    tied = getattr(getattr(model, "config", None), "tie_embeddings", False)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not (tied and k == "output.weight")}


def check_against_model(ckpt: WeightSource, model: nn.Module) -> None:
    """Raise LoadError unless ckpt's keys and shapes are exactly model's state dict (model may be on meta)."""
    expected = weight_keys(model)
    missing = [k for k in expected if k not in ckpt.specs]
    unexpected = [k for k in ckpt.specs if k not in expected]
    where = f"{ckpt.path} ({ckpt.form})"
    if missing or unexpected:
        parts = [f"missing keys: {_listing(missing)}"] if missing else []
        parts += [f"unexpected keys: {_listing(unexpected)}"] if unexpected else []
        raise LoadError(f"{where}: tensors do not match the config's model; " + "; ".join(parts))
    wrong = [f"{k} (expected {shape}, got {ckpt.specs[k][0]})" for k, shape in expected.items()
             if ckpt.specs[k][0] != shape]
    if wrong:
        raise LoadError(f"{where}: shape mismatch against the config's model: {_listing(wrong)}")
    bad_dtype = [f"{k} ({dt})" for k, (_, dt) in ckpt.specs.items() if not dt.is_floating_point]
    if bad_dtype:
        raise LoadError(f"{where}: non-floating-point tensors: {_listing(bad_dtype)}")


def load_pretrained(path: str | Path, *, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
                    ops: Ops = REFERENCE_OPS) -> Transformer:
    """Load a checkpoint (any form above) into a Transformer running `ops`, every weight in dtype on device.

    Raises LoadError (a ValueError) on a missing path, a directory matching no form, malformed or
    contradicting params.json/config.json, missing/unexpected keys, shape mismatches or unreadable files.
    """
    with open_weights(path) as ckpt:
        with torch.device("meta"):  # parameters without storage: assign below gives them the loaded tensors
            model = Transformer(ckpt.config, ops=ops)
        check_against_model(ckpt, model)
        state = {}
        for key in ckpt.specs:
            # one tensor at a time: a cast/permute/join makes at most one transient copy of this tensor
            state[key] = ckpt.fetch(key, dtype, device)
        if ckpt.config.tie_embeddings:  # one tensor: the output projection is the embedding itself
            state["output.weight"] = state["tok_embeddings.weight"]
        model.load_state_dict(state, strict=True, assign=True)
        model.tie_weights()  # assign replaced both Parameters; make them one again
        del state
    left = [n for n, t in chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if left:  # would mean a module holds state the checkpoint key check did not see
        raise LoadError(f"{path}: parameters left on the meta device after loading: {_listing(left)}")
    return model
