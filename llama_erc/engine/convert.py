"""Convert a checkpoint (form 2: Meta consolidated.NN.pth, form 3: HF safetensors, form 4: GGUF) to form 1.
It lives in engine/ because a GGUF's vocabulary is written too, and that is data/'s (model/ imports no data/).

    python -m llama_erc.engine.convert SRC DST [--dtype bf16|fp16|fp32] [--max-shard-size 2GB] [--no-tokenizer]

DST gets Meta-named safetensors shards (model.safetensors, or model-00001-of-0000N.safetensors ...),
model.safetensors.index.json {"metadata": {"total_size": bytes}, "weight_map": {key: file}}, a params.json
that rebuilds the exact ModelConfig (model.config.to_meta_params), and the tokenizer:
  * a directory source: the tokenizer files it has (TOKENIZER_FILES: tokenizer.model, tokenizer.json,
    tokenizer_config.json, chat_template.jinja, ...), copied as they are;
  * a GGUF source (SRC is the .gguf file or a directory holding one): the embedded vocabulary written as
    tokenizer.json + tokenizer_config.json (data.tokenizers.save_hf_tokenizer), which data.load_tokenizer
    reads as the same tokenizer as the GGUF itself. It is built before anything is written; a GGUF whose
    vocabulary data/ cannot read (SentencePiece-style) is refused unless --no-tokenizer is given.
Tied embeddings are stored once (tok_embeddings.weight; params.json says tie_embeddings).
Every later load_pretrained(DST) is then a zero-copy safetensors load.

The source is validated exactly as load_pretrained does before anything is written. Tensors stream one
shard at a time (at most one shard's tensors live at once); each tensor keeps its source dtype unless
--dtype is given. Shards are written under a temporary name and renamed, so a crash leaves no truncated shard.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from llama_erc.data import DataError
from llama_erc.data.tokenizers import load_gguf_tokenizer, save_hf_tokenizer
from llama_erc.model.config import to_meta_params
from llama_erc.model.gguf import field_value, import_gguf
from llama_erc.model.llama import Transformer
from llama_erc.model.load import LoadError, check_against_model, open_weights, weight_keys

# copied from a directory source when present: what data.load_tokenizer reads (tokenizer.json's side files too)
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'2GB' -> 2_000_000_000, '500MiB' -> 524_288_000, '1024' -> 1024."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"bad size {text!r}; use e.g. 2GB, 500MB, 1GiB or a byte count")
    size = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if size <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return size


def _plan_shards(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Greedy, in state-dict order: a tensor larger than max_bytes gets a shard of its own."""
    shards: list[list[str]] = [[]]
    used = 0
    for key, n in sizes.items():
        if shards[-1] and used + n > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += n
    return shards


def _gguf_tokenizer(path: Path):
    """The GGUF's embedded tokenizer as data/ builds it (the vocabulary -> tokenizer.json rules live there, next
    to the reader that must agree with them), or None when the file has no vocabulary."""
    reader = import_gguf(path).GGUFReader(str(path), "r")
    if field_value(reader, "tokenizer.ggml.model") is None:
        return None
    try:
        return load_gguf_tokenizer(path)
    except DataError as e:
        raise LoadError(f"{path}: cannot write its tokenizer ({e}); pass --no-tokenizer to convert the "
                        "weights only") from None


def convert(src: str | Path, dst: str | Path, *, dtype: torch.dtype | None = None,
            max_shard_size: int = 2 * 10**9, tokenizer: bool = True) -> list[Path]:
    """Write form 1 of the checkpoint at src into dst (plus the tokenizer, see above); returns the shard paths."""
    src, dst = Path(src), Path(dst)
    if dst.exists() and src.exists() and dst.resolve() == src.resolve():
        raise LoadError(f"{dst}: destination is the source directory")
    if dst.is_dir() and (any(dst.glob("*.safetensors")) or (dst / "params.json").exists()):
        raise LoadError(f"{dst}: already holds a checkpoint (params.json or *.safetensors); pick an empty dir")
    with open_weights(src) as ckpt:
        with torch.device("meta"):
            model = Transformer(ckpt.config)
        check_against_model(ckpt, model)
        tok = _gguf_tokenizer(ckpt.path) if tokenizer and ckpt.form == "gguf" else None
        keys = list(weight_keys(model))  # our module order (a shard holds neighbouring layers); tied: no output
        out_dtype = {k: dtype or ckpt.specs[k][1] for k in keys}
        sizes = {k: _numel(ckpt.specs[k][0]) * out_dtype[k].itemsize for k in keys}
        plan = _plan_shards(sizes, max_shard_size)
        dst.mkdir(parents=True, exist_ok=True)
        weight_map, paths = {}, []
        for i, shard_keys in enumerate(plan):
            name = "model.safetensors" if len(plan) == 1 else f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
            # owned reads (no mmap views): the source's pages do not pile up in RSS as shards are written
            tensors = {k: ckpt.fetch(k, out_dtype[k], zero_copy=False) for k in shard_keys}
            tmp = dst / (name + ".tmp")
            save_file(tensors, str(tmp), metadata={"format": "pt"})
            os.replace(tmp, dst / name)
            del tensors  # frees this shard's copies before the next is built
            weight_map.update(dict.fromkeys(shard_keys, name))
            paths.append(dst / name)
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (dst / "params.json").write_text(json.dumps(to_meta_params(ckpt.config), indent=2) + "\n")
        if tok is not None:
            save_hf_tokenizer(tok, dst)
        elif tokenizer and src.is_dir():
            for name in TOKENIZER_FILES:
                if (src / name).is_file():
                    shutil.copyfile(src / name, dst / name)
    return paths


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llama_erc.engine.convert", description=__doc__.split("\n\n")[0])
    p.add_argument("src", type=Path, help="checkpoint: a directory (Meta consolidated.NN.pth, HF safetensors) "
                                          "or a .gguf file (or a directory holding one)")
    p.add_argument("dst", type=Path, help="output directory (created; must not already hold a checkpoint)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="cast every tensor (default: keep the source dtype)")
    p.add_argument("--max-shard-size", type=parse_size, default="2GB", help="bytes per shard, e.g. 2GB (default)")
    p.add_argument("--no-tokenizer", action="store_true", help="write the weights only (no tokenizer files)")
    args = p.parse_args(argv)
    try:
        paths = convert(args.src, args.dst, dtype=DTYPES.get(args.dtype), max_shard_size=args.max_shard_size,
                        tokenizer=not args.no_tokenizer)
    except LoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {len(paths)} shard(s), index and params.json to {args.dst}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
