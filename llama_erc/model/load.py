"""Validated loading of pretrained LLaMA-family weights into our Transformer, from any of four forms.

Forms (detected from the directory; readers in model/forms.py):
    1. params.json + Meta-named *.safetensors (+ model.safetensors.index.json): what engine/convert.py writes;
       the zero-copy path.
    2. params.json + consolidated.NN.pth: Meta's download; model-parallel shards joined per tensor.
    3. config.json + HF-named model*.safetensors (+ index): renamed, wq/wk un-permuted to Meta's rotary order;
       a `*-bnb-4bit` one (bitsandbytes NF4, double-quantized) is dequantized at load, or, with base_quant="nf4",
       its NF4 blocks are kept as the file holds them (never requantized; q/k rows permuted after dequantizing).
    4. a GGUF file (or a directory holding one): llama.cpp's format, dequantized tensor by tensor (model/gguf.py),
       or, with base_quant="gguf", its quantized tensors kept as the file's blocks (model/quant.py).
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

import hashlib
from itertools import chain
from pathlib import Path

import torch
from torch import nn

from llama_erc.kernels import REFERENCE_OPS, Ops
from llama_erc.model.forms import FORMS, WeightSource, LoadError, _listing, detect_form, open_weights
from llama_erc.model.llama import Transformer
from llama_erc.model.quant import (BASE_QUANT, QuantizedWeight, install, nf4_quantized_weight, quantize_weight,
                                   quantized_at_load)

__all__ = ["FORMS", "LoadError", "WeightSource", "check_against_model", "weight_keys", "detect_form", "load_pretrained",
           "open_weights", "weights_fingerprint"]

_WEIGHT_SUFFIXES = (".gguf", ".safetensors", ".pth", ".json")
_HEAD_BYTES, _SAMPLES, _SAMPLE_BYTES = 1 << 20, 64, 64 << 10


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
    wrong = [f"{k} (expected {shape}, got {ckpt.specs[k][0]}" +
             (f" from the quant_state of {ckpt.nf4[k].origin()})" if k in ckpt.nf4 else ")")
             for k, shape in expected.items() if ckpt.specs[k][0] != shape]
    if wrong:
        raise LoadError(f"{where}: shape mismatch against the config's model: {_listing(wrong)}")
    bad_dtype = [f"{k} ({dt})" for k, (_, dt) in ckpt.specs.items() if not dt.is_floating_point]
    if bad_dtype:
        raise LoadError(f"{where}: non-floating-point tensors: {_listing(bad_dtype)}")


def _quantized_keys(ckpt: WeightSource, base_quant: str) -> dict[str, str | None]:
    """{key: GGUF type kept as blocks (gguf), "NF4" (a bnb-4bit file's blocks kept) or None (quantized at load:
    nf4 / q8_0)} for the tensors held quantized; checked before any weight byte is read."""
    if base_quant not in BASE_QUANT:
        raise LoadError(f"base_quant {base_quant!r} is unknown; choose one of {', '.join(BASE_QUANT)}")
    if ckpt.nf4:  # a bitsandbytes 4-bit checkpoint: its NF4 blocks are kept (nf4) or dequantized (none), no other
        if base_quant in ("gguf", "q8_0"):
            raise LoadError(f"{ckpt.path} ({ckpt.form}): a bitsandbytes 4-bit (NF4) checkpoint; --base_quant "
                            f"{base_quant} cannot hold it (that would requantize already quantized weights): use "
                            "nf4 to keep its NF4 blocks, or none to dequantize them at load")
        if base_quant == "none":
            return {}
        bad = [k for k in ckpt.nf4 if k == "tok_embeddings.weight"]
        if bad:  # transformers never quantizes an embedding; a packed embedding needs row-aligned GGUF blocks
            raise LoadError(f"{ckpt.nf4[bad[0]].origin()}: an NF4 token embedding cannot be held packed (rows "
                            "are gathered); use --base_quant none")
        return {k: "NF4" for k in ckpt.nf4}  # what the file holds dense stays dense (llm_int8_skip_modules)
    if base_quant == "none":
        return {}
    if base_quant == "gguf":
        if ckpt.gguf is None:
            raise LoadError(f"{ckpt.path} ({ckpt.form}): --base_quant gguf keeps a GGUF file's blocks; this "
                            "checkpoint is not a GGUF file (use nf4 or q8_0 to quantize it at load)")
        return {k: t for k in ckpt.specs if (t := ckpt.gguf.block_type(k)) is not None}
    keys = {k: None for k in ckpt.specs if quantized_at_load(k)}
    if base_quant == "q8_0":
        bad = [f"{k} {ckpt.specs[k][0]}" for k in keys if ckpt.specs[k][0][1] % 32]
        if bad:
            raise LoadError(f"{ckpt.path}: q8_0 needs rows of whole 32-element blocks: {_listing(bad)}")
    return keys


def load_pretrained(path: str | Path, *, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
                    ops: Ops = REFERENCE_OPS, base_quant: str = "none") -> Transformer:
    """Load a checkpoint (any form above) into a Transformer running `ops`, every weight in dtype on device.

    base_quant (model/quant.py): "none" (every weight dense in dtype), "gguf" (a GGUF file's quantized tensors
    kept as its blocks), "nf4" / "q8_0" (the block linears quantized as each is read: peak memory is the packed
    model plus one dense tensor; on a bnb-4bit checkpoint nf4 keeps the file's NF4 blocks instead, and gguf /
    q8_0 are refused); dtype is then the compute dtype they dequantize into.
    Raises LoadError (a ValueError) on a missing path, a directory matching no form, malformed or
    contradicting params.json/config.json, missing/unexpected keys, shape mismatches, unreadable files, or a
    base_quant the checkpoint cannot take.
    """
    with open_weights(path) as ckpt:
        with torch.device("meta"):  # parameters without storage: assign below gives them the loaded tensors
            model = Transformer(ckpt.config, ops=ops)
        check_against_model(ckpt, model)
        quantized = _quantized_keys(ckpt, base_quant)
        state, packed = {}, {}
        for key in ckpt.specs:
            # one tensor at a time: a cast/permute/join makes at most one transient copy of this tensor
            if key not in quantized:
                state[key] = ckpt.fetch(key, dtype, device)
            elif quantized[key] == "NF4":  # a bnb-4bit file's blocks as they are (q/k: rows permuted on dequant)
                owned = torch.device(device).type != "cpu"  # CPU: views of the mapped file, nothing converted
                packed[key] = nf4_quantized_weight(ckpt.read_nf4(key, owned), dtype, ops, device,
                                                   ckpt.nf4[key].row_heads)
            elif quantized[key] is not None:  # gguf: the file's blocks as they are
                packed[key] = QuantizedWeight(quantized[key], ckpt.specs[key][0], dtype,
                                              {"blocks": ckpt.gguf.read_blocks(key).to(device)}, ops=ops)
            else:  # nf4 / q8_0 from the tensor's fp32 values; the dense copy dies with this iteration
                packed[key] = quantize_weight(ckpt.fetch(key, torch.float32, device), base_quant, dtype, ops)
        if ckpt.config.tie_embeddings and "tok_embeddings.weight" in state:
            state["output.weight"] = state["tok_embeddings.weight"]  # one tensor: the output IS the embedding
        install(model, packed)  # before loading the rest: the swapped modules' dense weights are gone
        held = {f"{name}.{p}" for name, m in model.named_modules(remove_duplicate=False)
                if isinstance(m, QuantizedWeight) for p, _ in m.named_parameters()}  # already real
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        if unexpected or set(missing) - held:  # check_against_model above makes this unreachable; kept honest
            raise LoadError(f"{path}: state dict mismatch after quantizing: missing "
                            f"{_listing(sorted(set(missing) - held))}, unexpected {_listing(unexpected)}")
        model.tie_weights()  # assign replaced both Parameters; make them one again
        del state, packed
    left = [n for n, t in chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if left:  # would mean a module holds state the checkpoint key check did not see
        raise LoadError(f"{path}: parameters left on the meta device after loading: {_listing(left)}")
    return model


def weights_fingerprint(path: str | Path) -> dict:
    """A fingerprint of a checkpoint's files, fast at any size: each file's name and size, and one blake2b over
    its first MiB (a GGUF's metadata and tensor table, a safetensors header) and 64 evenly spaced 64 KiB samples.
    It tells one file from another (a file quantized or converted differently differs in its header and nearly
    everywhere in its bytes); it is not a checksum of every byte. path: a file, or a directory (its weight and
    config files: *.gguf, *.safetensors, *.pth, *.json)."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(f for f in path.iterdir() if f.suffix in _WEIGHT_SUFFIXES
                                                 and f.is_file())
    h = hashlib.blake2b(digest_size=16)
    sizes = {}
    for f in files:
        size = f.stat().st_size
        sizes[f.name] = size
        # a directory's files are told apart by name; one file is its bytes alone (a renamed copy is the same)
        h.update(f"{f.name if path.is_dir() else ''}:{size};".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(_HEAD_BYTES))
            for i in range(_SAMPLES):
                fh.seek(max(0, size - _SAMPLE_BYTES) * i // max(1, _SAMPLES - 1))
                h.update(fh.read(_SAMPLE_BYTES))
    return {"files": sizes, "blake2b": h.hexdigest()}
