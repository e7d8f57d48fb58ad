"""Tokenizers: one interface over four file formats (`base.Tokenizer`), and where a run finds its tokenizer.

    tok = load_tokenizer("/models/llama-2-7b")     # a file, or a checkpoint directory holding one
    ids = tok.encode(utterance)                    # plain text: "<|im_end|>" in it is text, never a control token
    ids = tok.encode_special("<|im_start|>user\n") # chat scaffolding: special-token strings become their ids

Backends (`tok.kind`), one module each: "sentencepiece" (LLaMA 2's `tokenizer.model`, or one made by
`train_tokenizer`; spm.py), "tiktoken" (Meta's Llama 3 `tokenizer.model`; tiktoken_llama3.py), "hf" (a
`tokenizer.json`) and "gguf" (the vocabulary embedded in a GGUF file) (both bpe.py). The last three need an
optional extra (`tiktoken`, `tokenizers`, `gguf`), imported only when such a file is loaded.

Discovery lives here and only here: `find_tokenizer(model, tokenizer)` is what train.py, eval.py and bench.py
use to find the tokenizer that goes with a checkpoint.
"""
from __future__ import annotations

import re
from pathlib import Path

from llama_erc.data.schema import DataError
from llama_erc.data.tokenizers.base import Tokenizer, require, split_specials
from llama_erc.data.tokenizers.bpe import BPETokenizer, load_gguf_tokenizer, load_hf_tokenizer, save_hf_tokenizer
from llama_erc.data.tokenizers.spm import PAD_FALLBACK_ID, SentencePieceTokenizer, train_tokenizer
from llama_erc.data.tokenizers.tiktoken_llama3 import TiktokenTokenizer

DIR_LOOKUP = ("tokenizer.json", "tokenizer.model", "*.gguf")    # what load_tokenizer(dir) looks for, in order

__all__ = ["BPETokenizer", "DIR_LOOKUP", "PAD_FALLBACK_ID", "SentencePieceTokenizer", "TiktokenTokenizer",
           "Tokenizer", "find_tokenizer", "find_tokenizer_file", "load_gguf_tokenizer", "load_hf_tokenizer",
           "load_tokenizer", "require", "save_hf_tokenizer", "split_specials", "train_tokenizer"]


def _sniff(path: Path) -> str:
    """The backend for a file, by content: GGUF magic, a JSON object, tiktoken's `base64 rank` lines, or
    (anything else) a SentencePiece protobuf, which its own loader validates."""
    with path.open("rb") as f:
        head = f.read(256)
    if head[:4] == b"GGUF":
        return "gguf"
    if head.lstrip()[:1] == b"{":
        return "hf"
    if re.fullmatch(rb"[A-Za-z0-9+/]+=* \d+", head.split(b"\n", 1)[0].rstrip(b"\r")):
        return "tiktoken"
    return "sentencepiece"


def find_tokenizer_file(directory: Path) -> Path:
    """The first of DIR_LOOKUP present in `directory` (several GGUFs: the first by name)."""
    for pattern in DIR_LOOKUP:
        found = sorted(p for p in directory.glob(pattern) if p.is_file())
        if found:
            return found[0]
    raise DataError(f"{directory}: no tokenizer found (looked for {', '.join(DIR_LOOKUP)})")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer in `path`: a tokenizer file, or a directory holding one (see DIR_LOOKUP)."""
    path = Path(path)
    if path.is_dir():
        path = find_tokenizer_file(path)
    elif not path.is_file():
        raise DataError(f"{path}: no such tokenizer file or directory")
    kind = _sniff(path)
    if kind == "sentencepiece":
        return SentencePieceTokenizer(path)
    if kind == "tiktoken":
        return TiktokenTokenizer(path)
    return load_gguf_tokenizer(path) if kind == "gguf" else load_hf_tokenizer(path)


def find_tokenizer(model: str | Path, tokenizer: str | Path = "") -> Path:
    """The tokenizer that goes with a checkpoint: `tokenizer` (--tokenizer, a file or a directory) when given,
    else the checkpoint's own: a .gguf model file's embedded vocabulary, the model directory (DIR_LOOKUP, in
    that order), or the parent directory's tokenizer.model (Meta's download layout)."""
    if tokenizer:
        if not Path(tokenizer).exists():
            raise DataError(f"--tokenizer {tokenizer}: no such file or directory")
        return Path(tokenizer)
    model_path = Path(model)
    if model_path.is_file():
        return model_path
    if model_path.is_dir():
        if any(any(model_path.glob(pattern)) for pattern in DIR_LOOKUP):
            return model_path
        if (model_path.parent / "tokenizer.model").is_file():
            return model_path.parent / "tokenizer.model"
    raise DataError(f"no tokenizer: pass --tokenizer (looked for {', '.join(DIR_LOOKUP)} in {model_path} and "
                    "tokenizer.model in its parent)")
