"""Readers for the four on-disk checkpoint forms; each yields Meta-named tensors in Meta's layout.

    1. "meta-safetensors": params.json + Meta-named *.safetensors (one or many shards, optional
       model.safetensors.index.json {"weight_map": {key: file}}). What engine/convert.py writes.
    2. "meta-pth": params.json + consolidated.00.pth .. consolidated.NN.pth, Meta's original download.
       13B/70B come as NN+1 model-parallel shards of every tensor, joined on the axis that Meta's
       fairscale layers split (_MP_AXIS); norms are replicated; `rope.freqs` is a derived buffer, ignored.
    3. "hf-safetensors": config.json + model*.safetensors (+ model.safetensors.index.json) with HF
       names; renamed with model/hf_keys.py, and wq/wk rows un-permuted from rotate-half order.
       Also `*-bnb-4bit` checkpoints (transformers + bitsandbytes 4-bit, see "bitsandbytes 4-bit" below).
    4. "gguf": one llama.cpp GGUF file (or a directory holding exactly one, and no other form), dequantized
       per tensor (model/gguf.py). Tensors are always owned copies (dequantization writes new memory).

open_weights(path) reads only JSON and tensor headers (names, shapes, dtypes): every consistency
check can run before any weight byte is touched. Tensors then come one at a time through
WeightSource.fetch(key, dtype, device), in Meta's layout. Memory, per tensor:
  * zero-copy: on CPU in the file's dtype with no re-layout, safetensors (>= 0.8) and torch.load(mmap=True)
    return copy-on-write views of the memory-mapped file; nothing is read until used.
  * otherwise (cast, HF q/k un-permute, another device): safetensors bytes are read with pread into
    one owned tensor, so no file-backed pages stay resident beside the result; the cast/permute makes
    at most one transient copy of that one tensor. Form 2 stays memory-mapped (torch.load has no pread),
    so joining model-parallel shards or casting keeps touched file pages resident (clean page cache, but
    counted in RSS) until loading ends: convert form 2 to form 1 once (python -m llama_erc.engine.convert).

bitsandbytes 4-bit (form 3): config.json's quantization_config {quant_method: "bitsandbytes", load_in_4bit: true,
bnb_4bit_quant_type: "nf4", bnb_4bit_use_double_quant: true} (bnb_4bit_quant_storage uint8, the default). What
transformers writes for each quantized linear (bitsandbytes Linear4bit._save_to_state_dict ->
QuantState.as_dict(packed=True)) is `<m>.weight` uint8 (ceil(n/2), 1), `.weight.absmax` uint8 (n_blocks,),
`.weight.nested_absmax` F32, `.weight.nested_quant_map` F32 (256,), `.weight.quant_map` F32 (16,) and
`.weight.quant_state.bitsandbytes__nf4`, the UTF-8 bytes of a JSON dict with quant_type, blocksize, dtype, shape,
nested_blocksize, nested_dtype and nested_offset (kernels/reference_nf4.py). Those six collapse into one spec,
`<m>.weight` with the quant_state's shape and dtype, so the key and shape checks see every linear as usual; the
quant_state JSONs and the quant_map tables (a few hundred bytes per linear, no weight bytes) are read and checked
at open: NF4, blocksize 64, nested blocksize 256, fp32 nested absmax, each sub-key's header shape and dtype, the
NF4 table. fp4, single quantization, 8-bit (llm_int8), other storage dtypes and other quant_methods are refused
by name from config.json before any tensor is read. Modules left dense (llm_int8_skip_modules, lm_head, the
embedding, the norms) load as stored. WeightSource.nf4 lists the quantized keys; read_nf4(key) gives the file's
blocks as an NF4Weight (q/k rows still in HF's order: model/quant.py keeps them and permutes the dequantized
rows), and fetch(key) dequantizes (fp32 math, one rounding into dtype, one tensor at a time) and un-permutes q/k.
"""
from __future__ import annotations

import json
import math
import re
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from torch import Tensor

from llama_erc.kernels.reference_nf4 import NESTED_BLOCK, NF4_BLOCK, NF4_CODE, OUT_DTYPES, NF4Weight
from llama_erc.model.config import ModelConfig, from_hf_config, from_meta_params
from llama_erc.model.gguf import GGUFFile, find_gguf
from llama_erc.model.hf_keys import hf_to_meta_key, permute_to_meta, qk_heads
from llama_erc.model.quant import dequantize_nf4_chunked

FORMS = ("meta-safetensors", "meta-pth", "hf-safetensors", "gguf")
_LOOKED_FOR = ("(1) params.json + Meta-named *.safetensors, (2) params.json + consolidated.NN.pth, "
               "(3) config.json + HF-named model*.safetensors, (4) one *.gguf file")
_INDEX = "model.safetensors.index.json"
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# Model-parallel split axis per Meta key (layer prefix stripped): ParallelEmbedding splits the embedding
# dim (1); column-parallel linears split output rows (0); row-parallel linears split input columns (1).
_MP_AXIS = {"tok_embeddings.weight": 1, "output.weight": 0,
            "attention.wq.weight": 0, "attention.wk.weight": 0, "attention.wv.weight": 0,
            "feed_forward.w1.weight": 0, "feed_forward.w3.weight": 0,
            "attention.wo.weight": 1, "feed_forward.w2.weight": 1,
            "attention_norm.weight": None, "ffn_norm.weight": None, "norm.weight": None}
_LAYER_PREFIX = re.compile(r"^layers\.\d+\.")
# bitsandbytes 4-bit: the sub-keys of a quantized `<m>.weight` (QuantState.as_dict(packed=True)), and any
# quant_state key whatever its quant type (so that fp4 is refused by name, not as an unexpected key)
_BNB_STATE = "quant_state.bitsandbytes__"
_BNB_SUBKEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", _BNB_STATE + "nf4")
_BNB_SUBKEY_RE = re.compile(r"^(.+\.weight)\.(absmax|quant_map|nested_absmax|nested_quant_map|"
                            r"quant_state\.bitsandbytes__(\w+))$")
_BNB_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_PTH_NAME = re.compile(r"^consolidated\.(\d+)\.pth$")

Spec = tuple[tuple[int, ...], torch.dtype]  # (shape, dtype) of one tensor, from a header


class LoadError(ValueError):
    """A checkpoint directory that cannot be loaded exactly; the message names the file or key."""


@dataclass(frozen=True)
class NF4Entry:
    """Where one bnb-4bit linear lives: its HF `weight` key, the shard holding it, the nested offset of its
    quant_state, and the heads its rows are un-permuted by (wq: n_heads, wk: n_kv_heads, else None)."""
    hf_key: str
    file: Path
    offset: float
    row_heads: int | None

    def origin(self) -> str:
        return f"{self.file}: {self.hf_key}"


@dataclass
class WeightSource:
    """An opened checkpoint: config and tensor specs (headers only); fetch() reads one tensor."""
    form: str                            # one of FORMS
    path: Path
    config: ModelConfig
    specs: dict[str, Spec]               # Meta key (or the raw name when it has none) -> (shape, dtype)
    _read: Callable[[str, bool], Tensor] = field(repr=False)  # (Meta key, owned) -> CPU, Meta layout, file dtype
    _stack: ExitStack = field(default_factory=ExitStack, repr=False)
    _read_as: Callable[[str, torch.dtype], Tensor] | None = field(default=None, repr=False)  # GGUF: (key, dtype) -> CPU
    gguf: GGUFFile | None = field(default=None, repr=False)  # GGUF: the file, for its raw blocks (model/quant.py)
    nf4: dict[str, NF4Entry] = field(default_factory=dict, repr=False)  # bnb-4bit: Meta key -> its NF4 tensors
    _read_nf4: Callable[[str, bool], NF4Weight] | None = field(default=None, repr=False)

    def read_nf4(self, key: str, owned: bool = False) -> NF4Weight:
        """A bnb-4bit file's NF4 blocks for `key` (one of self.nf4) as they are stored, on CPU: q/k rows in HF's
        rotate-half order (self.nf4[key].row_heads says how many heads to un-permute by). owned=False allows
        copy-on-write views of the memory-mapped file."""
        return self._read_nf4(key, owned)

    def fetch(self, key: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
              zero_copy: bool = True) -> Tensor:
        """One tensor in Meta layout, contiguous, in dtype (default: the file's) on device.

        zero_copy: allow a memory-mapped view of the file when nothing needs converting (CPU, same dtype).
        """
        src_dtype = self.specs[key][1]
        dtype = dtype or src_dtype
        if key in self.nf4:  # dequantized: fp32 math, one rounding into dtype; q/k rows back in Meta's order
            w = dequantize_nf4_chunked(self.read_nf4(key), dtype if dtype in OUT_DTYPES else torch.float32)
            heads = self.nf4[key].row_heads
            return (w if heads is None else permute_to_meta(w, heads)).to(device=device, dtype=dtype).contiguous()
        if self._read_as is not None:  # dequantized straight into dtype: no full-size copy in the spec's dtype
            return self._read_as(key, dtype).to(device=device)
        view_ok = zero_copy and torch.device(device).type == "cpu" and dtype == src_dtype
        return self._read(key, not view_ok).to(device=device, dtype=dtype).contiguous()

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> WeightSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise LoadError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoadError(f"{path}: malformed JSON ({e})") from None
    if not isinstance(data, dict):
        raise LoadError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def detect_form(path: Path) -> str:
    """Which of FORMS `path` holds, from file names (and, for safetensors, the key naming)."""
    if not path.exists():
        raise LoadError(f"{path}: no such file or directory")
    if not path.is_dir():
        if path.suffix.lower() == ".gguf":
            return "gguf"
        raise LoadError(f"{path}: not a directory or a .gguf file; a checkpoint is a .gguf file or a "
                              f"directory holding one of {_LOOKED_FOR}")
    st, pth = sorted(path.glob("*.safetensors")), sorted(path.glob("consolidated.*.pth"))
    has_params, has_config = (path / "params.json").is_file(), (path / "config.json").is_file()
    if st:  # safetensors win over .pth: they load zero-copy
        if (path / _INDEX).is_file():
            names = _index_map(path).keys()
        else:
            with ExitStack() as stack:
                names = _SafetensorsSet(path, [st[0]], None, stack, uint8=True).specs.keys()  # names only
        if any(k.startswith("model.") or k == "lm_head.weight" for k in names):
            if not has_config:
                raise LoadError(f"{path}: HF-named *.safetensors but no config.json (looked for {_LOOKED_FOR})")
            return "hf-safetensors"
        if not has_params:
            raise LoadError(f"{path}: Meta-named *.safetensors but no params.json (looked for {_LOOKED_FOR})")
        return "meta-safetensors"
    if pth:
        if not has_params:
            raise LoadError(f"{path}: consolidated.*.pth but no params.json (looked for {_LOOKED_FOR})")
        return "meta-pth"
    try:
        if find_gguf(path) is not None:
            return "gguf"
    except ValueError as e:
        raise LoadError(str(e)) from None
    raise LoadError(f"{path}: no checkpoint found; looked for {_LOOKED_FOR}")


def open_weights(path: str | Path) -> WeightSource:
    """Detect the form, read config + headers; tensors are read later, one per WeightSource.fetch call."""
    path = Path(path)
    form = detect_form(path)
    stack = ExitStack()
    try:
        if form == "gguf":
            try:
                gf = GGUFFile(find_gguf(path))
            except ValueError as e:  # messages name the file
                raise LoadError(str(e)) from None
            stack.callback(gf.close)
            return WeightSource(form, gf.path, gf.config, gf.specs, gf.read, stack,
                                lambda key, dtype: gf.read(key, True, dtype), gf)
        if form == "meta-pth":
            shards = _PthShards(path)
            specs, read = shards.specs, shards.read
        else:
            # without an index: every *.safetensors (HF: model*.safetensors when there are any)
            files = sorted(path.glob("*.safetensors"))
            if form == "hf-safetensors":
                files = sorted(path.glob("model*.safetensors")) or files
            hf_json = read_json(path / "config.json") if form == "hf-safetensors" else {}
            bnb = form == "hf-safetensors" and _bnb_4bit(hf_json, path / "config.json")  # refusals: no tensor read
            st = _SafetensorsSet(path, files, _index_map(path) if (path / _INDEX).is_file() else None, stack,
                                 uint8=form == "hf-safetensors")
            specs, read = st.specs, st.read
        if form == "hf-safetensors":
            cfg = _config(from_hf_config, hf_json, source=str(path / "config.json"))
            specs, quantized = _bnb_view(st, bnb, path / "config.json")
            specs, read, nf4, read_nf4 = _hf_view(specs, read, cfg, quantized, st)
            return WeightSource(form, path, cfg, specs, read, stack, nf4=nf4, _read_nf4=read_nf4)
        else:
            params = read_json(path / "params.json")
            vocab = specs.get("tok_embeddings.weight", ((None,), None))[0][0]
            cfg = _config(from_meta_params, params, vocab_size=vocab, source=str(path / "params.json"),
                          has_output="output.weight" in specs)
        return WeightSource(form, path, cfg, specs, read, stack)
    except BaseException:
        stack.close()
        raise


def _config(builder, data: dict, **kw) -> ModelConfig:
    try:
        return builder(data, **kw)
    except (ValueError, TypeError) as e:  # ModelConfig/builder complaints already name the source file
        raise LoadError(f"{kw['source']}: {e}" if kw["source"] not in str(e) else str(e)) from None


def _index_map(path: Path) -> dict[str, str]:
    index = read_json(path / _INDEX)
    wmap = index.get("weight_map")
    if not isinstance(wmap, dict) or not all(isinstance(v, str) for v in wmap.values()):
        raise LoadError(f"{path / _INDEX}: no 'weight_map' object of key -> file name")
    return wmap


class _SafetensorsSet:
    """Several safetensors shards seen as one key space. Headers are read at construction; a truncated or
    corrupt file fails here, naming the file, before any tensor is read."""

    def __init__(self, root: Path, files: list[Path], index: dict[str, str] | None, stack: ExitStack,
                 uint8: bool = False):
        if index is not None:  # the index decides which files make up the checkpoint
            names = sorted(set(index.values()))
            missing = [n for n in names if not (root / n).is_file()]
            if missing:
                raise LoadError(f"{root / _INDEX} lists missing shard file(s): {', '.join(missing)}")
            files = [root / n for n in names]
        self.specs: dict[str, Spec] = {}
        self._file: dict[str, Path] = {}
        self._handles, self._pread = {}, {}
        self._stack = stack
        for f in files:
            try:
                h = stack.enter_context(safe_open(str(f), framework="pt", device="cpu"))
                keys = list(h.keys())
                raw = {k: (tuple(h.get_slice(k).get_shape()), h.get_slice(k).get_dtype()) for k in keys}
            except Exception as e:  # SafetensorError does not name the file
                raise LoadError(f"{f}: unreadable safetensors file (truncated or corrupt?): {e}") from None
            self._handles[f] = h
            for k, (shape, dt) in raw.items():
                if k in self._file:
                    raise LoadError(f"tensor {k!r} appears in both {self._file[k]} and {f}")
                if dt not in _ST_DTYPES and not (uint8 and dt == "U8"):  # U8: bnb-4bit's, checked in _bnb_view
                    raise LoadError(f"{f}: tensor {k!r} has dtype {dt}; expected one of {list(_ST_DTYPES)}")
                if index is not None and index.get(k) != f.name:
                    raise LoadError(f"{root / _INDEX} does not map {k!r} to {f.name}, the file that holds it")
                self._file[k], self.specs[k] = f, (shape, _ST_DTYPES.get(dt, torch.uint8))
        if index is not None and set(index) - set(self._file):
            absent = sorted(set(index) - set(self._file))
            raise LoadError(f"{root / _INDEX} maps tensors that no shard holds: {_listing(absent)}")

    def read(self, key: str, owned: bool) -> Tensor:
        f = self._file[key]
        if not owned:
            return self._handles[f].get_tensor(key)  # mmap-backed, copy-on-write: no read yet
        if f not in self._pread:
            try:  # pread: bytes land in an owned tensor; no mapped file pages stay resident beside it
                self._pread[f] = self._stack.enter_context(safe_open(str(f), framework="pt", backend="pread"))
            except TypeError:  # safetensors < 0.8 has no backend choice (and copies on get_tensor anyway)
                self._pread[f] = self._handles[f]
        return self._pread[f].get_tensor(key)


def _bnb_4bit(hf: dict, source: Path) -> bool:
    """Whether config.json declares a bitsandbytes 4-bit checkpoint (one this loader reads: NF4, double-quantized,
    uint8 storage); any other quantization_config is refused by name. Reads no tensor."""
    qc = hf.get("quantization_config")
    if qc is None:
        return False
    if not isinstance(qc, dict):
        raise LoadError(f"{source}: quantization_config must be an object, got {type(qc).__name__}")
    method = qc.get("quant_method")
    ours = ("bitsandbytes 4-bit NF4 with double quantization (load_in_4bit, bnb_4bit_quant_type nf4, "
            "bnb_4bit_use_double_quant true), e.g. unsloth's *-bnb-4bit")
    if method != "bitsandbytes":
        raise LoadError(f"{source}: quantization_config.quant_method {method!r} is not supported; the one "
                        f"pre-quantized HF form this loader reads is {ours}")
    if qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
        raise LoadError(f"{source}: bitsandbytes 8-bit (LLM.int8, load_in_8bit) is not supported; only {ours}")
    if not (qc.get("load_in_4bit") or qc.get("_load_in_4bit")):
        raise LoadError(f"{source}: quantization_config has quant_method bitsandbytes but neither load_in_4bit nor "
                        f"load_in_8bit; only {ours} is supported")
    quant_type = qc.get("bnb_4bit_quant_type", "fp4")  # BitsAndBytesConfig's default is fp4
    if quant_type != "nf4":
        raise LoadError(f"{source}: bnb_4bit_quant_type {quant_type!r} is not supported; only {ours}")
    if qc.get("bnb_4bit_use_double_quant") is not True:
        raise LoadError(f"{source}: bnb_4bit_use_double_quant is {qc.get('bnb_4bit_use_double_quant')!r}: "
                        f"single-quantized (fp32 absmax) NF4 is not supported; only {ours}")
    storage = qc.get("bnb_4bit_quant_storage", "uint8")
    if storage != "uint8":
        raise LoadError(f"{source}: bnb_4bit_quant_storage {storage!r} is not supported (uint8 only)")
    return True


def _bnb_view(st: _SafetensorsSet, bnb: bool, source: Path) -> tuple[dict[str, Spec], dict[str, float]]:
    """HF specs with every bnb-4bit linear's six tensors collapsed into its `weight` key (quant_state's shape and
    dtype), and {HF weight key: nested offset} of those linears. Checks every sub-key's header, each quant_state
    JSON and quant_map (metadata only); raises LoadError naming the file and key."""
    groups: dict[str, dict[str, str]] = {}  # HF weight key -> {sub-key suffix: full key}
    for k in st.specs:
        if m := _BNB_SUBKEY_RE.match(k):
            groups.setdefault(m.group(1), {})[k[len(m.group(1)) + 1:]] = k
    if not bnb:
        stray = sorted(k for g in groups.values() for k in g.values()) + \
            sorted(k for k, (_, dt) in st.specs.items() if dt == torch.uint8 and k not in groups)
        if stray:
            raise LoadError(f"{st._file[stray[0]]}: tensor {stray[0]!r} looks bitsandbytes-quantized, but "
                            f"{source} has no quantization_config")
        return dict(st.specs), {}
    specs: dict[str, Spec] = {k: v for k, v in st.specs.items() if not _BNB_SUBKEY_RE.match(k)}
    offsets: dict[str, float] = {}
    for w, subs in sorted(groups.items()):
        f = st._file[next(iter(subs.values()))]
        for sub, k in subs.items():
            if sub.startswith(_BNB_STATE) and sub != _BNB_STATE + "nf4":
                raise LoadError(f"{st._file[k]}: {k!r}: bitsandbytes quant type {sub[len(_BNB_STATE):]!r} is not "
                                "supported (NF4 with double quantization only)")
        missing = [f"{w}.{s}" for s in _BNB_SUBKEYS if s not in subs] + ([w] if w not in st.specs else [])
        if missing:
            raise LoadError(f"{f}: {w!r} is bitsandbytes 4-bit but {_listing(missing)} is missing (a quantized "
                            f"linear has `weight` and its {', '.join(_BNB_SUBKEYS)})")
        shape, dtype, offset = _bnb_state(st, w)
        specs[w], offsets[w] = (shape, dtype), offset
    stray = [k for k, (_, dt) in specs.items() if dt == torch.uint8 and k not in offsets]
    if stray:
        raise LoadError(f"{st._file[stray[0]]}: uint8 tensor {stray[0]!r} has no bitsandbytes quant_state "
                        f"(missing sub-key {stray[0]}.{_BNB_STATE}nf4)")
    if not offsets:
        raise LoadError(f"{source} declares bitsandbytes 4-bit, but no tensor has a "
                        f"`.weight.{_BNB_STATE}nf4` quant_state")
    return specs, offsets


def _bnb_state(st: _SafetensorsSet, w: str) -> tuple[tuple[int, ...], torch.dtype, float]:
    """(shape, dtype, nested offset) of the bnb-4bit weight `w`, from its quant_state JSON; the sub-keys'
    headers and the quant_map are checked against it."""
    key = f"{w}.{_BNB_STATE}nf4"
    where = f"{st._file[key]}: {key!r}"
    raw = st.read(key, True)
    try:
        js = json.loads(bytes(raw.reshape(-1).tolist()).decode("utf-8")) if raw.dtype == torch.uint8 else None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoadError(f"{where}: quant_state is not UTF-8 JSON ({e})") from None
    if not isinstance(js, dict):
        raise LoadError(f"{where}: quant_state must be the uint8 bytes of a JSON object")
    want = {"quant_type": "nf4", "blocksize": NF4_BLOCK, "nested_blocksize": NESTED_BLOCK, "nested_dtype": "float32"}
    for name, value in want.items():
        if js.get(name) != value:
            raise LoadError(f"{where}: {name} {js.get(name)!r} is not supported (NF4 with blocksize 64, "
                            "double-quantized in fp32 blocks of 256, is)")
    shape, dtype, offset = js.get("shape"), js.get("dtype"), js.get("nested_offset")
    if not (isinstance(shape, list) and len(shape) == 2 and all(type(d) is int and d > 0 for d in shape)):
        raise LoadError(f"{where}: shape {shape!r} is not the (out, in) shape of a linear weight")
    if dtype not in _BNB_DTYPES:
        raise LoadError(f"{where}: dtype {dtype!r} is not one of {list(_BNB_DTYPES)}")
    if type(offset) not in (int, float) or not math.isfinite(offset):
        raise LoadError(f"{where}: nested_offset {offset!r} is not a finite number")
    n = shape[0] * shape[1]
    n_blocks = -(-n // NF4_BLOCK)
    headers = {w: (((-(-n // 2), 1), (-(-n // 2),)), torch.uint8), f"{w}.absmax": (((n_blocks,),), torch.uint8),
               f"{w}.nested_absmax": (((-(-n_blocks // NESTED_BLOCK),),), torch.float32),
               f"{w}.nested_quant_map": (((256,),), torch.float32), f"{w}.quant_map": (((16,),), torch.float32)}
    for k, (shapes, dt) in headers.items():
        got = st.specs[k]
        if got[0] not in shapes or got[1] != dt:
            raise LoadError(f"{st._file[k]}: {k!r} is {got[1]} of shape {got[0]}, but the quant_state's shape "
                            f"{tuple(shape)} needs {dt} of shape {shapes[0]}")
    qmap = st.read(f"{w}.quant_map", True)
    if not torch.equal(qmap.view(torch.int32), NF4_CODE.view(torch.int32)):
        raise LoadError(f"{st._file[w + '.quant_map']}: {w + '.quant_map'!r} is not bitsandbytes' NF4 table")
    return tuple(shape), _BNB_DTYPES[dtype], float(offset)


def _hf_view(specs: dict[str, Spec], read: Callable[[str, bool], Tensor], cfg: ModelConfig,
             quantized: dict[str, float], st: _SafetensorsSet):
    """Rename HF keys to Meta keys; wq/wk are un-permuted (a per-tensor copy) when read. bnb-4bit linears
    (`quantized`, from _bnb_view) become NF4Entry records and a reader of their blocks."""
    meta_specs, hf_name, nf4 = {}, {}, {}
    for k, spec in specs.items():
        try:
            mk = hf_to_meta_key(k)
        except KeyError:
            mk = k  # kept under its HF name so the key check reports it as unexpected
        if mk is not None:  # None: rotary inv_freq buffers, recomputed by the model
            meta_specs[mk], hf_name[mk] = spec, k
            if k in quantized:
                nf4[mk] = NF4Entry(k, st._file[k], quantized[k], qk_heads(mk, cfg.n_heads, cfg.n_kv_heads))
    if cfg.tie_embeddings:  # some tied checkpoints also store lm_head (a copy of the embedding): not loaded
        meta_specs.pop("output.weight", None)
        nf4.pop("output.weight", None)

    def read_meta(key: str, owned: bool) -> Tensor:
        if key in nf4:  # WeightSource.fetch dequantizes these; their packed bytes are not a weight
            raise LoadError(f"{nf4[key].origin()} is bitsandbytes 4-bit: read it with read_nf4 or fetch")
        heads = qk_heads(key, cfg.n_heads, cfg.n_kv_heads)
        if heads is None:
            return read(hf_name[key], owned)
        return permute_to_meta(read(hf_name[key], True), heads)  # permuting copies: read owned bytes

    def read_nf4(key: str, owned: bool) -> NF4Weight:
        e = nf4[key]
        w = e.hf_key
        return NF4Weight(packed=read(w, owned).view(-1), absmax_codes=read(f"{w}.absmax", owned),
                         nested_absmax=read(f"{w}.nested_absmax", owned),
                         nested_code=read(f"{w}.nested_quant_map", owned), offset=e.offset,
                         shape=meta_specs[key][0])

    return meta_specs, read_meta, nf4, read_nf4


def _listing(keys: list[str], limit: int = 20) -> str:
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


class _PthShards:
    """consolidated.NN.pth model-parallel shards, memory-mapped; read() joins one tensor across them."""

    def __init__(self, path: Path):
        files = sorted(path.glob("consolidated.*.pth"), key=lambda f: f.name)
        numbers = [int(m.group(1)) if (m := _PTH_NAME.match(f.name)) else -1 for f in files]
        if numbers != list(range(len(files))):
            raise LoadError(f"{path}: model-parallel shards must be consolidated.00.pth .. "
                                  f"consolidated.{len(files) - 1:02d}.pth, found {[f.name for f in files]}")
        self.shards: list[dict[str, Tensor]] = []
        for f in files:
            try:  # mmap: tensors stay on disk until used; weights_only: no pickle code execution
                sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise LoadError(f"{f}: unreadable torch checkpoint (truncated or corrupt?): {e}") from None
            if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
                raise LoadError(f"{f}: expected a dict of tensors")
            sd.pop("rope.freqs", None)  # derived from rope_theta; the model computes its own
            for k, v in sd.items():
                if not v.is_floating_point():
                    raise LoadError(f"{f}: tensor {k!r} has dtype {v.dtype}; expected floating point")
            if self.shards and set(sd) != set(self.shards[0]):
                diff = sorted(set(sd) ^ set(self.shards[0]))
                raise LoadError(f"{f} and {files[0].name} hold different keys: {_listing(diff)}")
            self.shards.append(sd)
        self.specs = {k: self._spec(k, files) for k in self.shards[0]}

    def _axis(self, key: str) -> int | None:
        return _MP_AXIS.get(_LAYER_PREFIX.sub("", key))

    def _spec(self, key: str, files: list[Path]) -> Spec:
        shapes = [tuple(sd[key].shape) for sd in self.shards]
        axis = self._axis(key)
        for f, s in zip(files, shapes):
            # every shard must agree off the split axis (on every axis for replicated tensors)
            if len(s) != len(shapes[0]) or any(a != b for d, (a, b) in enumerate(zip(s, shapes[0])) if d != axis):
                raise LoadError(f"{f}: tensor {key!r} has shape {s}, incompatible with "
                                      f"{files[0].name}'s {shapes[0]} (split axis {axis})")
        if axis is None or len(shapes) == 1 or axis >= len(shapes[0]):
            return shapes[0], self.shards[0][key].dtype
        joined = list(shapes[0])
        joined[axis] = sum(s[axis] for s in shapes)
        return tuple(joined), self.shards[0][key].dtype

    def read(self, key: str, owned: bool) -> Tensor:  # owned is moot: torch.load only maps (see module doc)
        axis = self._axis(key)
        if axis is None or len(self.shards) == 1:
            return self.shards[0][key]  # replicated (norms) or unsharded: the mmap view itself
        return torch.cat([sd[key] for sd in self.shards], dim=axis)  # one owned copy of this tensor only
