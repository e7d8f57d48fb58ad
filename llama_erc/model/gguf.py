"""Form 4: a GGUF file (llama.cpp's format), read with the `gguf` package, llama.cpp's own reader.

The `gguf` package is an optional extra (`pip install 'llama-lora-erc[gguf]'`), imported only when a GGUF file is
opened.

Config: from the `llama.*` metadata (embedding_length, block_count, head_count, head_count_kv,
feed_forward_length, layer_norm_rms_epsilon, rope.freq_base, context_length); vocab_size from
`llama.vocab_size` or the token list. No `output.weight` tensor means the output projection is tied to the
embedding (SmolLM2). A `rope_freqs.weight` tensor is llama.cpp's form of Llama 3 rotary scaling (per-frequency
wavelength factors); it is matched against the Llama 3 scalings with the standard parameters (factor 8 or 32,
low 1, high 4, original context 8192), and refused when it matches none.

Names: llama.cpp's -> Meta's (token_embd -> tok_embeddings, blk.N.attn_q -> layers.N.attention.wq, ...).
Row order: llama.cpp's converter permutes HF's q/k rows (rotate-half) into the interleaved-pair order of
GGML's "normal" rope, which is Meta's order, so GGUF q/k rows load as they are (checked against transformers'
GGUF loader, which permutes them back to HF's order, in tests/model/test_gguf.py).
Types: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K and Q6_K are dequantized (gguf.quants.dequantize, fp32)
one tensor at a time, a chunk of rows at a time straight into the requested dtype; any other type is refused by
name before any tensor is read.
Numpy shapes are GGUF's dims reversed, i.e. PyTorch's (out, in) layout already.
With --base_quant gguf (model/quant.py) the quantized tensors are not dequantized: read_blocks gives their raw
blocks as they are in the file, kept as such in the model.
"""
from __future__ import annotations

import mmap
from pathlib import Path

import torch
from torch import Tensor

from llama_erc.model.config import ModelConfig

SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")
_LAYER_MAP = {"attn_norm": "attention_norm", "ffn_norm": "ffn_norm", "attn_q": "attention.wq",
              "attn_k": "attention.wk", "attn_v": "attention.wv", "attn_output": "attention.wo",
              "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2", "ffn_up": "feed_forward.w3"}
_TOP_MAP = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
            "output.weight": "output.weight"}
_ROPE_FREQS = "rope_freqs.weight"
_DEQUANT_CHUNK = 1 << 16  # elements per gguf.quants.dequantize call: its temporaries stay small (see read)


def import_gguf(path: Path):
    try:
        import gguf
    except ImportError:
        raise ValueError(f"{path}: reading GGUF files needs the 'gguf' package: pip install 'llama-lora-erc[gguf]' "
                         "(from a checkout: pip install -e '.[gguf]')") from None
    return gguf


def gguf_to_meta_key(name: str) -> str | None:
    """llama.cpp tensor name -> Meta key; None when it has no Meta counterpart (the caller reports it)."""
    if name in _TOP_MAP:
        return _TOP_MAP[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_MAP and parts[3] == "weight":
        return f"layers.{parts[1]}.{_LAYER_MAP[parts[2]]}.weight"
    return None


def field_value(reader, key: str, default=None):
    """A metadata value (int, float, bool, str or list), or default when absent."""
    field = reader.fields.get(key)
    return default if field is None else field.contents()


class GGUFFile:
    """An opened GGUF file: config, Meta-keyed specs (shape, dtype after dequantization) and read()."""

    def __init__(self, path: Path):
        gguf = import_gguf(path)
        try:
            self.reader = gguf.GGUFReader(str(path), "r")
        except Exception as e:  # the reader raises ValueError/struct errors without the path
            raise ValueError(f"{path}: unreadable GGUF file (truncated or corrupt?): {e}") from None
        self.path, self._gguf = path, gguf
        arch = field_value(self.reader, "general.architecture")
        if arch != "llama":
            raise ValueError(f"{path}: general.architecture {arch!r} is unsupported (only 'llama')")
        self.tensors, self.specs, extra = {}, {}, {}
        for t in self.reader.tensors:
            type_name = t.tensor_type.name
            if type_name not in SUPPORTED_TYPES:
                raise ValueError(f"{path}: tensor {t.name!r} has GGUF type {type_name}, unsupported; "
                                 f"supported: {', '.join(SUPPORTED_TYPES)}")
            if t.name.endswith(".bias"):
                raise ValueError(f"{path}: tensor {t.name!r} is a bias; LLaMA linears have no bias, unsupported")
            key = gguf_to_meta_key(t.name)
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists dims innermost first
            if key is None:
                extra[t.name] = t
                continue
            self.tensors[key] = t
            self.specs[key] = (shape, torch.float16 if type_name == "F16" else torch.float32)
        rope_freqs = extra.pop(_ROPE_FREQS, None)
        for name in extra:  # kept under the GGUF name so the key check names it
            self.specs[name] = (tuple(int(d) for d in reversed(extra[name].shape.tolist())), torch.float32)
            self.tensors[name] = extra[name]
        self.config = self._config(rope_freqs)
        # Keep only the tensors and the file mapping: the parsed metadata (numpy views per vocabulary token and
        # merge: ~150 MiB of Python objects for SmolLM2's 49k tokens) is not needed once the config is built.
        self._data, self.reader = self.reader.data, None

    def _config(self, rope_freqs) -> ModelConfig:
        r, src = self.reader, str(self.path)

        def need(key: str):
            value = field_value(r, f"llama.{key}")
            if value is None:
                raise ValueError(f"{src}: missing metadata key 'llama.{key}'")
            return value

        dim, n_heads = int(need("embedding_length")), int(need("attention.head_count"))
        head_dim = dim // n_heads
        for key in ("attention.key_length", "attention.value_length", "rope.dimension_count"):
            value = field_value(r, f"llama.{key}")
            if value is not None and int(value) != head_dim:
                raise ValueError(f"{src}: llama.{key} = {value} differs from embedding_length / head_count "
                                 f"({head_dim}); unsupported")
        scaling = field_value(r, "llama.rope.scaling.type")
        if scaling not in (None, "none"):
            raise ValueError(f"{src}: llama.rope.scaling.type {scaling!r} is unsupported (llama3 scaling comes "
                             f"as a {_ROPE_FREQS} tensor)")
        tokens = r.fields.get("tokenizer.ggml.tokens")  # counted, not decoded: field.data has one entry per item
        vocab = field_value(r, "llama.vocab_size") or (len(tokens.data) if tokens is not None else None)
        if vocab is None:
            raise ValueError(f"{src}: no llama.vocab_size and no tokenizer.ggml.tokens to count")
        kw = dict(dim=dim, n_layers=int(need("block_count")), n_heads=n_heads,
                  n_kv_heads=int(field_value(r, "llama.attention.head_count_kv") or n_heads),
                  hidden_dim=int(need("feed_forward_length")), vocab_size=int(vocab),
                  norm_eps=float(field_value(r, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
                  rope_theta=float(field_value(r, "llama.rope.freq_base", 10000.0)),
                  max_seq_len=int(field_value(r, "llama.context_length", 4096)),
                  tie_embeddings="output.weight" not in self.specs)
        if rope_freqs is not None:
            kw.update(self._llama3_rope(ModelConfig(**kw), rope_freqs))
        return ModelConfig(**kw)

    def _llama3_rope(self, base: ModelConfig, rope_freqs) -> dict:
        """The Llama 3 scaling whose wavelength factors are the file's rope_freqs tensor."""
        from llama_erc.model.rope import rope_inv_freq
        stored = torch.tensor(self._gguf.quants.dequantize(rope_freqs.data, rope_freqs.tensor_type)).flatten()
        plain = rope_inv_freq(base)
        for factor in (8.0, 32.0, 16.0, 4.0):
            cand = dict(rope_type="llama3", rope_factor=factor, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                        rope_original_max_seq_len=8192)
            scaled = rope_inv_freq(ModelConfig(**{**base.__dict__, **cand}))
            if stored.shape == plain.shape and torch.allclose(plain / scaled, stored, rtol=1e-4):
                return cand
        raise ValueError(f"{self.path}: tensor {_ROPE_FREQS!r} matches no Llama 3 rotary scaling with the standard "
                         "parameters (factor 4/8/16/32, low 1, high 4, original context 8192); unsupported")

    def read(self, key: str, owned: bool = True, dtype: torch.dtype | None = None) -> Tensor:
        """One tensor in PyTorch layout, owned memory, in dtype (default: its spec's, fp32; F16 stays F16).

        Memory: the result is allocated once, in dtype, and filled a chunk of rows at a time (_DEQUANT_CHUNK
        elements: numpy's dequantization makes several temporaries of its input's size, and a bf16 load never
        holds a full fp32 copy); then the file pages under the tensor are dropped (_drop_pages). Measured on
        SmolLM2 as bf16 (benchmarks/load_rss.py --gguf; 257 MiB of weights, a 94 MiB file): peak RSS
        355 MiB, against 602 MiB with whole-tensor fp32 dequantization, a cast, and the metadata kept.
        """
        t = self.tensors[key]
        shape, spec_dtype = self.specs[key]
        out = torch.empty(shape, dtype=dtype or spec_dtype)
        n_rows = shape[0] if len(shape) > 1 else 1
        src = t.data.reshape(n_rows, -1)  # (rows, elements or bytes per row): a view of the memory-mapped file
        flat = out.view(n_rows, -1)  # (rows, elements per row)
        plain = t.tensor_type.name in ("F32", "F16")
        step = max(1, _DEQUANT_CHUNK // flat.shape[1])
        for r in range(0, n_rows, step):
            part = src[r:r + step]
            part = part.copy() if plain else self._gguf.quants.dequantize(part, t.tensor_type)  # owned (rows, cols)
            flat[r:r + step] = torch.from_numpy(part)  # copy_ casts to dtype
        self._drop_pages(t)
        return out

    def block_type(self, key: str) -> str | None:
        """The tensor's GGUF type name when it is quantized blocks (not F32/F16/BF16), else None."""
        name = self.tensors[key].tensor_type.name
        return None if name in ("F32", "F16", "BF16") else name

    def read_blocks(self, key: str) -> Tensor:
        """A quantized tensor's raw blocks as they are in the file: owned uint8 (rows, bytes per row), each row
        whole blocks (GGUF stores rows of whole blocks); then its file pages are dropped, as read() does."""
        t = self.tensors[key]
        rows = self.specs[key][0][0] if len(self.specs[key][0]) > 1 else 1
        out = torch.from_numpy(t.data.reshape(rows, -1).copy())  # (rows, bytes per row), owned
        self._drop_pages(t)
        return out

    def _drop_pages(self, t) -> None:
        """MADV_DONTNEED the file pages under tensor t: a read-only shared mapping of clean page cache, so the
        kernel simply re-reads them if they are ever touched again; until the file is closed they would
        otherwise count in RSS beside the dequantized copy (up to the file's size)."""
        mm = getattr(self._data, "_mmap", None)
        if mm is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = t.data_offset - t.data_offset % mmap.PAGESIZE
        mm.madvise(mmap.MADV_DONTNEED, start, t.data_offset + int(t.n_bytes) - start)

    def close(self) -> None:
        mm = getattr(self._data, "_mmap", None)
        self.tensors, self._data = {}, None  # numpy views of the mapping: mmap.close() refuses while they live
        if mm is not None:
            try:
                mm.close()
            except (BufferError, ValueError):  # a caller still holds a view; the GC closes it later
                pass


def find_gguf(path: Path) -> Path | None:
    """The GGUF file that `path` names: the file itself, or the one *.gguf in a directory (None if none)."""
    if path.is_file():
        return path if path.suffix.lower() == ".gguf" else None
    files = sorted(path.glob("*.gguf"))
    if len(files) > 1:
        raise ValueError(f"{path}: holds {len(files)} GGUF files ({', '.join(f.name for f in files)}); "
                         "pass the one to load")
    return files[0] if files else None
