"""LoRA adapters as a llama.cpp LoRA adapter GGUF: the file `convert_lora_to_gguf.py` writes and `--lora`
(`llama_adapter_lora_init`) loads on top of a LLaMA GGUF base.

    export_llamacpp_lora(lora_state_dict(model), lora_config_of(model), "adapter.gguf")
    tensors, alpha = read_llamacpp_lora("adapter.gguf")     # our names and torch shapes, fp32

What llama.cpp expects (paths in the llama.cpp tree; lines as of the copy vendored in llama-cpp-python 0.3.36):
  * metadata, checked in src/llama-adapter.cpp llama_adapter_lora_init_impl:
      general.type = "adapter"            (l.205-208; else "expect general.type to be 'adapter'")
      general.architecture = "llama"      (l.210-214; must equal the base model's, else "model arch and LoRA arch
                                           mismatch")
      adapter.type = "lora"               (l.216-219)
      adapter.lora.alpha, a FLOAT32 value (l.221; gguf_get_val_f32 asserts the stored type is f32,
                                           ggml/src/gguf.cpp l.1150-1153 -> l.195-196, so a float64 aborts).
    The converter writes the first three through set_type / GGUFWriter(arch=...) and alpha with add_float32
    (convert_lora_to_gguf.py l.422-428); its LoraModel.set_gguf_parameters replaces the base model's, so no
    `llama.*` hyper-parameters and no general.file_type are written; general.quantization_version is
    (conversion/base.py l.1222). Key names: gguf-py/gguf/constants.py Keys.Adapter.TYPE / LORA_ALPHA (l.366-368),
    GGUFType.ADAPTER (l.489-491).
  * tensors: `<base tensor name>.lora_a` and `.lora_b` (convert_lora_to_gguf.py l.525-526, a then b, adjacent),
    i.e. `blk.{i}.attn_q.weight.lora_a`. Our Meta names -> llama.cpp's (src/llama-arch.cpp l.447-456):
    wq -> attn_q, wk -> attn_k, wv -> attn_v, wo -> attn_output, w1 -> ffn_gate, w2 -> ffn_down, w3 -> ffn_up.
    At load every tensor must end in .lora_a or .lora_b (`*_norm.weight` is skipped; anything else is refused,
    l.276-296), each pair must be complete (l.328-330) and name a tensor of the base (l.333-336).
  * shapes: the converter writes PEFT's A (r, in) and B (out, r) as they are (LoraTorchTensor l.41-42), so GGUF
    dims (ggml ne, innermost first) are lora_a [in, r] and lora_b [r, out]. llama-adapter.cpp l.365-370 checks
    base ne[0] (in) == a.ne[0], base ne[1] (out) == b.ne[1], and a.ne[1] == b.ne[0] (the rank). Only
    token_embd's lora_a is transposed (l.360-363; converter l.521-523); we never target the embedding.
  * scale: build_lora_mm (src/llama-graph.cpp l.1534-1549) adds scale * B (A x) to W x, with
    scale = adapter_scale * alpha / rank, rank = b->ne[0] read from the tensor (src/llama-adapter.h l.53-56;
    alpha == 0 means no alpha/rank factor). With `--lora` (adapter_scale 1) and alpha written = our alpha,
    llama.cpp's scale equals our s = alpha / r. It applies to wq/wk/wv (llama-graph.cpp l.1703-1731), wo
    (l.2821) and the FFN's up/gate/down (l.1800-1940).
  * dtype: F32 by default (the converter's --outtype default, l.287), or F16 / BF16 (l.342-344; its q8_0 and
    auto are not offered here). Lora tensors get the file's type like any weight (conversion/base.py l.1142-1148).
    alpha is stored as float32, so an alpha that float32 cannot hold (0.1) reads back rounded.

Row order of wq/wk: our model keeps Meta's interleaved rotary row order. llama.cpp's HF converter permutes HF's
rotate-half q/k rows into exactly that order (conversion/llama.py LlamaModel.permute l.176-181, applied l.260-264),
so a GGUF base's attn_q/attn_k rows are in Meta order (see model/gguf.py) and our B rows (which index W's output
rows) pair with them as they are: no permutation. For a PEFT (HF-order) adapter the converter runs the same
permute on the LoraTorchTensor, which reshapes and permutes B's rows only and leaves A (it indexes the input)
alone (LoraTorchTensor.reshape l.136, .permute l.168-174); our export_peft's B rows (hf_keys.permute_to_hf) permuted
that way give back ours, which tests/model/test_llamacpp_lora.py checks.

The `gguf` package (llama.cpp's own reader/writer) is an optional extra, imported only here, when called.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from llama_erc.model.gguf import field_value, import_gguf
from llama_erc.model.lora import VALID_TARGETS, LoRAConfig

# Meta linear -> (its Meta module, llama.cpp's tensor name)
_LINEARS = {"wq": ("attention", "attn_q"), "wk": ("attention", "attn_k"), "wv": ("attention", "attn_v"),
            "wo": ("attention", "attn_output"), "w1": ("feed_forward", "ffn_gate"),
            "w2": ("feed_forward", "ffn_down"), "w3": ("feed_forward", "ffn_up")}
_FROM_LLAMACPP = {cpp: meta for meta, (_, cpp) in _LINEARS.items()}
_OUTTYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16"}  # --outtype -> GGML type
_READ_TYPES = ("F32", "F16", "BF16", "Q8_0")  # what convert_lora_to_gguf.py can write, all dequantized to fp32
_META_KEY = re.compile(r"layers\.(\d+)\.(attention|feed_forward)\.(w[qkvo123])\.lora_([ab])")
_CPP_NAME = re.compile(r"blk\.(\d+)\.([a-z_]+)\.weight\.lora_([ab])")


def _llamacpp_name(layer: int, lin: str, ab: str) -> str:
    return f"blk.{layer}.{_LINEARS[lin][1]}.weight.lora_{ab}"


def _pairs(tensors: dict[str, Tensor], cfg: LoRAConfig) -> list[tuple[int, str, Tensor, Tensor]]:
    """(layer, linear, A (r, in), B (out, r)) in file order (layer, then VALID_TARGETS order); ValueError on any key
    that is not an adapter key, a lone A or B, a rank other than cfg.rank, or a linear outside cfg.targets."""
    found: dict[tuple[int, str], dict[str, Tensor]] = {}
    for key, t in tensors.items():
        m = _META_KEY.fullmatch(key)
        if m is None or _LINEARS[m[3]][0] != m[2]:
            raise ValueError(f"export_llamacpp_lora: {key!r} is not a LoRA adapter key "
                             "('layers.N.attention.wq.lora_a', ...; see lora_state_dict)")
        if not isinstance(t, Tensor) or t.dim() != 2 or not t.is_floating_point():
            raise ValueError(f"export_llamacpp_lora: {key!r} must be a 2-D float tensor, got "
                             f"{getattr(t, 'shape', type(t).__name__)}")
        if m[3] not in cfg.targets:
            raise ValueError(f"export_llamacpp_lora: {key!r} targets {m[3]}, not in the config's targets "
                             f"{list(cfg.targets)}")
        found.setdefault((int(m[1]), m[3]), {})[m[4]] = t
    if not found:
        raise ValueError("export_llamacpp_lora: no adapter tensors given")
    out = []
    for (layer, lin), ab in sorted(found.items(), key=lambda kv: (kv[0][0], VALID_TARGETS.index(kv[0][1]))):
        base = f"layers.{layer}.{_LINEARS[lin][0]}.{lin}"
        if set(ab) != {"a", "b"}:
            raise ValueError(f"export_llamacpp_lora: {base}.lora_{'b' if 'a' in ab else 'a'} is missing "
                             f"(llama.cpp refuses a lone lora_a or lora_b)")
        a, b = ab["a"], ab["b"]
        if a.shape[0] != cfg.rank or b.shape[1] != cfg.rank:
            raise ValueError(f"export_llamacpp_lora: {base}: lora_a {tuple(a.shape)} (r, in) and lora_b "
                             f"{tuple(b.shape)} (out, r) do not both have the config's rank {cfg.rank}")
        out.append((layer, lin, a, b))
    missing = set(cfg.targets) - {lin for _, lin, _, _ in out}
    if missing:
        raise ValueError(f"export_llamacpp_lora: the config targets {sorted(missing)} but no tensors are given for "
                         "them")
    return out


def export_llamacpp_lora(tensors: dict[str, Tensor], cfg: LoRAConfig, path: str | Path, *, base_name: str = "",
                         outtype: str = "f32") -> Path:
    """Write `tensors` (lora_state_dict's names and shapes) and cfg.alpha as a llama.cpp LoRA GGUF; returns path.

    outtype: "f32" (default, exact), "f16" or "bf16" (rounded to nearest even), as the converter's --outtype.
    base_name, if given, is recorded as general.base_model.0.name (where the converter records the adapter's base
    model) and in general.name. Everything is checked before the file is opened; the file is written beside its
    final name and renamed into place, so a failed write leaves no partial adapter.
    """
    path = Path(path)
    if outtype not in _OUTTYPES:
        raise ValueError(f"export_llamacpp_lora: outtype {outtype!r} is unsupported; valid: {', '.join(_OUTTYPES)}")
    pairs = _pairs(tensors, cfg)
    gguf = import_gguf(path)
    qtype = gguf.GGMLQuantizationType[_OUTTYPES[outtype]]
    tmp = path.with_name(path.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), "llama")  # writes general.architecture = "llama"
    try:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(cfg.alpha))  # f32: llama.cpp reads nothing else
        if base_name:
            writer.add_name(f"{base_name} LoRA")
            writer.add_base_model_count(1)
            writer.add_base_model_name(0, base_name)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for layer, lin, a, b in pairs:
            for ab, t in (("a", a), ("b", b)):  # torch (r, in) / (out, r) -> GGUF dims [in, r] / [r, out]
                data = gguf.quants.quantize(t.detach().to("cpu", torch.float32).contiguous().numpy(), qtype)
                writer.add_tensor(_llamacpp_name(layer, lin, ab), data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_llamacpp_lora(path: str | Path) -> tuple[dict[str, Tensor], float]:
    """A llama.cpp LoRA GGUF -> ({'layers.3.attention.wq.lora_a': (r, in), ...: (out, r)} fp32, alpha).

    Checks what llama.cpp checks at load (general.type, adapter.type, f32 alpha, complete pairs, a.ne[1] ==
    b.ne[0]) plus what our model needs (architecture "llama", names of our seven linears, one rank). An alpha of 0
    means "no alpha / rank factor" to llama.cpp (llama-adapter.h l.55), i.e. s = 1, and is returned as the rank.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    gguf = import_gguf(path)
    try:
        reader = gguf.GGUFReader(str(path), "r")
    except Exception as e:  # the reader raises ValueError/struct errors without the path
        raise ValueError(f"{path}: unreadable GGUF file (truncated or corrupt?): {e}") from None
    for key, want in (("general.type", "adapter"), ("adapter.type", "lora"), ("general.architecture", "llama")):
        got = field_value(reader, key)
        if got != want:
            raise ValueError(f"{path}: metadata key {key!r} is {got!r}, expected {want!r} (a llama.cpp LoRA adapter "
                             "for a LLaMA base)")
    field = reader.fields.get(gguf.Keys.Adapter.LORA_ALPHA)
    if field is None:
        raise ValueError(f"{path}: metadata key 'adapter.lora.alpha' is missing (llama.cpp would apply the adapter "
                         "unscaled)")
    if field.types != [gguf.GGUFValueType.FLOAT32]:
        raise ValueError(f"{path}: metadata key 'adapter.lora.alpha' has type {[t.name for t in field.types]}, "
                         "llama.cpp reads only FLOAT32")
    alpha = float(field.contents())

    found: dict[tuple[int, str], dict[str, Tensor]] = {}
    for t in reader.tensors:
        m = _CPP_NAME.fullmatch(t.name)
        if m is None or m[2] not in _FROM_LLAMACPP:
            raise ValueError(f"{path}: tensor {t.name!r} is not the lora_a/lora_b of a LLaMA linear "
                             f"(blk.N.{{{','.join(_FROM_LLAMACPP)}}}.weight.lora_a/b); cannot map it")
        if t.tensor_type.name not in _READ_TYPES:
            raise ValueError(f"{path}: tensor {t.name!r} has GGUF type {t.tensor_type.name}, unsupported; "
                             f"supported: {', '.join(_READ_TYPES)}")
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF dims innermost first -> torch
        if len(shape) != 2:
            raise ValueError(f"{path}: tensor {t.name!r} has shape {shape}, expected 2-D")
        data = gguf.quants.dequantize(t.data, t.tensor_type)  # fp32 (view for F32, new array otherwise)
        found.setdefault((int(m[1]), _FROM_LLAMACPP[m[2]]), {})[m[3]] = \
            torch.from_numpy(np.array(data, dtype=np.float32).reshape(shape))  # owned: not a view of the mapping
    if not found:
        raise ValueError(f"{path}: no lora_a/lora_b tensors")
    out, ranks = {}, set()
    for (layer, lin), ab in sorted(found.items(), key=lambda kv: (kv[0][0], VALID_TARGETS.index(kv[0][1]))):
        name = f"blk.{layer}.{_LINEARS[lin][1]}.weight"
        if set(ab) != {"a", "b"}:
            raise ValueError(f"{path}: tensor {name}.lora_{'b' if 'a' in ab else 'a'} is missing: the lora_a/lora_b "
                             "pair is incomplete (llama.cpp refuses it too)")
        a, b = ab["a"], ab["b"]  # (r, in), (out, r)
        if a.shape[0] != b.shape[1]:
            raise ValueError(f"{path}: {name}: lora_a dims {list(reversed(a.shape))} and lora_b dims "
                             f"{list(reversed(b.shape))} disagree on the rank (llama.cpp: a.ne[1] == b.ne[0])")
        ranks.add(a.shape[0])
        key = f"layers.{layer}.{_LINEARS[lin][0]}.{lin}"
        out[f"{key}.lora_a"], out[f"{key}.lora_b"] = a, b
    if len(ranks) != 1:
        raise ValueError(f"{path}: tensors have ranks {sorted(ranks)}; one rank per adapter is supported")
    return out, (alpha if alpha else float(ranks.pop()))
