"""Readers for the four on-disk checkpoint forms; each yields Meta-named tensors in Meta's layout.

    1. "meta-safetensors": params.json + Meta-named *.safetensors (one or many shards, optional
       model.safetensors.index.json {"weight_map": {key: file}}). What engine/convert.py writes.
    2. "meta-pth": params.json + consolidated.00.pth .. consolidated.NN.pth, Meta's original download.
       13B/70B come as NN+1 model-parallel shards of every tensor, joined on the axis that Meta's
       fairscale layers split (_MP_AXIS); norms are replicated; `rope.freqs` is a derived buffer, ignored.
    3. "hf-safetensors": config.json + model*.safetensors (+ model.safetensors.index.json) with HF
       names; renamed with model/hf_keys.py, and wq/wk rows un-permuted from rotate-half order.
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
"""
from __future__ import annotations

import json
import re
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from torch import Tensor

from llama_erc.model.config import ModelConfig, from_hf_config, from_meta_params
from llama_erc.model.gguf import GGUFFile, find_gguf
from llama_erc.model.hf_keys import hf_to_meta_key, permute_to_meta, qk_heads

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
_PTH_NAME = re.compile(r"^consolidated\.(\d+)\.pth$")

Spec = tuple[tuple[int, ...], torch.dtype]  # (shape, dtype) of one tensor, from a header


class LoadError(ValueError):
    """A checkpoint directory that cannot be loaded exactly; the message names the file or key."""


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

    def fetch(self, key: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
              zero_copy: bool = True) -> Tensor:
        """One tensor in Meta layout, contiguous, in dtype (default: the file's) on device.

        zero_copy: allow a memory-mapped view of the file when nothing needs converting (CPU, same dtype).
        """
        src_dtype = self.specs[key][1]
        dtype = dtype or src_dtype
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
                names = _SafetensorsSet(path, [st[0]], None, stack).specs.keys()
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
            st = _SafetensorsSet(path, files, _index_map(path) if (path / _INDEX).is_file() else None, stack)
            specs, read = st.specs, st.read
        if form == "hf-safetensors":
            cfg = _config(from_hf_config, read_json(path / "config.json"), source=str(path / "config.json"))
            specs, read = _hf_view(specs, read, cfg)
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

    def __init__(self, root: Path, files: list[Path], index: dict[str, str] | None, stack: ExitStack):
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
                if dt not in _ST_DTYPES:
                    raise LoadError(f"{f}: tensor {k!r} has dtype {dt}; expected one of {list(_ST_DTYPES)}")
                if index is not None and index.get(k) != f.name:
                    raise LoadError(f"{root / _INDEX} does not map {k!r} to {f.name}, the file that holds it")
                self._file[k], self.specs[k] = f, (shape, _ST_DTYPES[dt])
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


def _hf_view(specs: dict[str, Spec], read: Callable[[str, bool], Tensor], cfg: ModelConfig):
    """Rename HF keys to Meta keys; wq/wk are un-permuted (a per-tensor copy) when read."""
    meta_specs, hf_name = {}, {}
    for k, spec in specs.items():
        try:
            mk = hf_to_meta_key(k)
        except KeyError:
            mk = k  # kept under its HF name so the key check reports it as unexpected
        if mk is not None:  # None: rotary inv_freq buffers, recomputed by the model
            meta_specs[mk], hf_name[mk] = spec, k
    if cfg.tie_embeddings:  # some tied checkpoints also store lm_head (a copy of the embedding): not loaded
        meta_specs.pop("output.weight", None)

    def read_meta(key: str, owned: bool) -> Tensor:
        heads = qk_heads(key, cfg.n_heads, cfg.n_kv_heads)
        if heads is None:
            return read(hf_name[key], owned)
        return permute_to_meta(read(hf_name[key], True), heads)  # permuting copies: read owned bytes

    return meta_specs, read_meta


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
