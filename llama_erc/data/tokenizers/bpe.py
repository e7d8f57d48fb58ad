"""BPE tokenizers run by the `tokenizers` package: an HF `tokenizer.json` ("hf"), or the vocabulary embedded in a
GGUF file ("gguf"), rebuilt the way the model's own tokenizer.json defines it.

Plain text: `tokenizers` matches added tokens ("<|im_end|>") inside the text even with add_special_tokens=False,
and utterances are data. So each tokenizer is kept twice: `full`, as the file defines it (decode, the special
ids), and `plain`, the same pipeline (normalizer, pre-tokenizer, model) with the special added tokens removed,
so their strings are cut up like any other text. Non-special added tokens stay: the reference matches them too.

HF side files, read from the tokenizer.json's directory when present (the first that answers wins):
    eos_id   tokenizer_config.json "eos_token" -> config.json "eos_token_id" -> generation_config.json
             "eos_token_id" (a list: its first id); none is an error naming the tokenizer.json
    bos_id   the same files' bos entries, else the special token the post-processor puts first, else None
    pad_id   tokenizer_config.json "pad_token" -> config.json "pad_token_id", else eos_id
    add_bos  tokenizer_config.json "add_bos_token", else whether the post-processor starts with a special token
    chat_template  tokenizer_config.json "chat_template", else a chat_template.jinja file
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llama_erc.data.schema import DataError
from llama_erc.data.tokenizers.base import Tokenizer, require

GGUF_CONTROL, GGUF_USER_DEFINED = 3, 4   # tokenizer.ggml.token_type values (llama.cpp's llama_token_type)

# Llama 3's split (llama.cpp "llama-bpe"): see data/tokenizers/tiktoken_llama3.py.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> (pre-tokenizer, BPE ignore_merges). "smollm" and its llama.cpp group (StarCoder's
# vocabulary family) isolate every digit, then split GPT-2's way; SmolLM2's tokenizer.json says
# Sequence[Digits(individual_digits=True), ByteLevel(use_regex=True)].
GGUF_PRE_TOKENIZERS = {
    "gpt2": ("gpt2", False),
    "smollm": ("digits+gpt2", False), "starcoder": ("digits+gpt2", False), "refact": ("digits+gpt2", False),
    "llama-bpe": ("llama3", True), "llama3": ("llama3", True),
}


def _pre_tokenizer(tokenizers, style: str):
    pt = tokenizers.pre_tokenizers
    if style == "llama3":
        return pt.Sequence([pt.Split(tokenizers.Regex(LLAMA3_SPLIT), behavior="isolated"),
                            pt.ByteLevel(add_prefix_space=False, use_regex=False)])
    byte_level = pt.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    return pt.Sequence([pt.Digits(individual_digits=True), byte_level]) if style == "digits+gpt2" else byte_level


def _find(spec: Any, kind: str) -> list[dict]:
    """Every component of type `kind` in a tokenizer.json sub-tree (Sequences nest them)."""
    if isinstance(spec, list):
        return [c for item in spec for c in _find(item, kind)]
    if not isinstance(spec, dict):
        return []
    here = [spec] if spec.get("type") == kind else []
    return here + [c for v in spec.values() if isinstance(v, (dict, list)) for c in _find(v, kind)]


def _adds_prefix_space(spec: dict) -> bool:
    """Whether the pipeline puts a space (or "▁") before the text: Prepend("▁"), Metaspace, ByteLevel."""
    norm, pre = spec.get("normalizer"), spec.get("pre_tokenizer")
    return (any(c.get("prepend") == "\u2581" for c in _find(norm, "Prepend"))
            or any(c.get("prepend_scheme", "always" if c.get("add_prefix_space", True) else "never") != "never"
                   for c in _find(pre, "Metaspace"))
            or any(c.get("add_prefix_space") for c in _find(pre, "ByteLevel")))


class BPETokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` behind the common interface (see the module docstring for `plain`)."""

    def __init__(self, full, *, path: Path, kind: str, bos_id: int | None, eos_id: int, pad_id: int | None,
                 add_bos: bool, chat_template: str | None):
        tokenizers = require("tokenizers", path)
        spec = json.loads(full.to_str())
        added = spec.get("added_tokens") or []
        self.special_tokens = {t["content"]: t["id"] for t in added if t["special"]}
        spec["added_tokens"] = [t for t in added if not t["special"]]
        self.full, self.plain = full, tokenizers.Tokenizer.from_str(json.dumps(spec))
        self.path, self.kind = path, kind
        self.vocab_size = max(full.get_vocab(with_added_tokens=True).values()) + 1
        self.bos_id, self.eos_id = bos_id, eos_id
        self.pad_id = eos_id if pad_id is None else pad_id      # no pad token: EOS (pad positions are masked)
        self.add_bos = add_bos and bos_id is not None
        self.dummy_prefix = _adds_prefix_space(spec)
        self.chat_template = chat_template

    def _encode(self, text: str) -> list[int]:
        return self.plain.encode(text, add_special_tokens=False).ids

    def _decode(self, ids: list[int]) -> str:
        return self.full.decode(ids, skip_special_tokens=True)

    def piece(self, token_id: int) -> str:
        return self.full.id_to_token(int(token_id))


# --- HF tokenizer.json ---------------------------------------------------------------------------------------

def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def _token_id(full, tok_cfg: dict, configs: list[dict], name: str) -> int | None:
    """The id of tokenizer_config's `<name>_token` (a string or {"content": ...}), else of the first config's
    `<name>_token_id` (a list gives its first id)."""
    token = tok_cfg.get(f"{name}_token")
    if isinstance(token, dict):
        token = token.get("content")
    if isinstance(token, str) and full.token_to_id(token) is not None:
        return full.token_to_id(token)
    for cfg in configs:
        value = cfg.get(f"{name}_token_id")
        value = value[0] if isinstance(value, list) and value else value
        if isinstance(value, int):
            return value
    return None


def _template_bos(spec: dict) -> int | None:
    """The id of the special token the post-processor's single-sequence template starts with, if any."""
    for proc in _find(spec.get("post_processor"), "TemplateProcessing"):
        single = proc.get("single") or []
        if single and "SpecialToken" in single[0]:
            name = single[0]["SpecialToken"]["id"]
            ids = proc.get("special_tokens", {}).get(name, {}).get("ids") or []
            return ids[0] if ids else None
    return None


def _chat_template(tok_cfg: dict, directory: Path) -> str | None:
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):   # older files: [{"name": "default", "template": ...}, ...]
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if isinstance(template, str):
        return template
    jinja = directory / "chat_template.jinja"
    return jinja.read_text(encoding="utf-8") if jinja.is_file() else None


def load_hf_tokenizer(path: Path) -> BPETokenizer:
    tokenizers = require("tokenizers", path)
    try:
        full = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:      # the Rust side raises plain Exception for a malformed file
        raise DataError(f"{path}: not a valid tokenizer.json ({e})") from None
    spec = json.loads(full.to_str())
    directory = path.parent
    tok_cfg = _read_json(directory / "tokenizer_config.json")
    configs = [_read_json(directory / "config.json"), _read_json(directory / "generation_config.json")]
    eos_id = _token_id(full, tok_cfg, configs, "eos")
    if eos_id is None:
        raise DataError(f"{path}: no EOS token: looked for eos_token in tokenizer_config.json and eos_token_id in "
                        f"config.json and generation_config.json in {directory}")
    template_bos = _template_bos(spec)
    bos_id = _token_id(full, tok_cfg, configs, "bos")
    bos_id = template_bos if bos_id is None else bos_id
    add_bos = tok_cfg.get("add_bos_token")
    add_bos = template_bos is not None if not isinstance(add_bos, bool) else add_bos
    return BPETokenizer(full, path=path, kind="hf", bos_id=bos_id, eos_id=eos_id,
                        pad_id=_token_id(full, tok_cfg, configs[:1], "pad"), add_bos=add_bos,
                        chat_template=_chat_template(tok_cfg, directory))


def save_hf_tokenizer(tok: BPETokenizer, directory: str | Path) -> list[Path]:
    """Write `tok` as tokenizer.json + tokenizer_config.json (bos/eos/pad tokens by name, add_bos_token,
    chat_template), which load_hf_tokenizer reads back as the same tokenizer: ids, specials, add_bos, template."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok.full.save(str(directory / "tokenizer.json"))
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": tok.add_bos}
    for name, token_id in (("bos", tok.bos_id), ("eos", tok.eos_id), ("pad", tok.pad_id)):
        if token_id is not None:
            config[f"{name}_token"] = tok.full.id_to_token(int(token_id))
    if tok.chat_template is not None:
        config["chat_template"] = tok.chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                     encoding="utf-8")
    return [directory / "tokenizer.json", directory / "tokenizer_config.json"]


# --- GGUF ----------------------------------------------------------------------------------------------------

def _gguf_fields(path: Path) -> dict[str, Any]:
    gguf = require("gguf", path)
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:      # struct/ValueError/... on a truncated or foreign file
        raise DataError(f"{path}: not a readable GGUF file ({e})") from None
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}


def load_gguf_tokenizer(path: Path) -> BPETokenizer:
    """Byte-level BPE from `tokenizer.ggml.*`: tokens (already in the byte-level alphabet), merges ("a b"),
    token_type (control -> special added token, user-defined -> plain added token), bos/eos/padding ids,
    add_bos_token (absent: False), `pre` (the split, see GGUF_PRE_TOKENIZERS; absent or unknown is an error) and
    `tokenizer.chat_template`. A SentencePiece-style vocabulary (`tokenizer.ggml.model == "llama"`) is refused."""
    tokenizers = require("tokenizers", path)
    meta = _gguf_fields(path)
    model = meta.get("tokenizer.ggml.model")
    if model is None or "tokenizer.ggml.tokens" not in meta:
        raise DataError(f"{path}: the GGUF has no embedded tokenizer (tokenizer.ggml.model / tokenizer.ggml.tokens)")
    if model != "gpt2":
        raise DataError(f"{path}: GGUF tokenizer model {model!r} is not supported (only byte-level BPE, 'gpt2'); "
                        "for a SentencePiece ('llama') vocabulary use the model's tokenizer.model")
    pre = meta.get("tokenizer.ggml.pre")   # absent in old files: llama.cpp then guesses ("default"); we do not
    if pre not in GGUF_PRE_TOKENIZERS:
        raise DataError(f"{path}: unknown GGUF pre-tokenizer {pre!r} (tokenizer.ggml.pre); "
                        f"supported: {', '.join(sorted(GGUF_PRE_TOKENIZERS))}")
    style, ignore_merges = GGUF_PRE_TOKENIZERS[pre]
    tokens, types = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type") or []
    merges = [tuple(m.split(" ")) for m in meta.get("tokenizer.ggml.merges") or []]
    if any(len(m) != 2 for m in merges):
        raise DataError(f"{path}: malformed tokenizer.ggml.merges entry {next(m for m in merges if len(m) != 2)}")
    full = tokenizers.Tokenizer(tokenizers.models.BPE(
        vocab={t: i for i, t in enumerate(tokens)}, merges=merges, ignore_merges=ignore_merges))
    full.pre_tokenizer = _pre_tokenizer(tokenizers, style)
    full.decoder = tokenizers.decoders.ByteLevel()
    full.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                             for t, k in zip(tokens, types) if k == GGUF_CONTROL])
    full.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False)
                     for t, k in zip(tokens, types) if k == GGUF_USER_DEFINED])
    eos_id = meta.get("tokenizer.ggml.eos_token_id")
    if eos_id is None:
        raise DataError(f"{path}: the GGUF has no tokenizer.ggml.eos_token_id")
    return BPETokenizer(full, path=path, kind="gguf", bos_id=meta.get("tokenizer.ggml.bos_token_id"),
                        eos_id=int(eos_id), pad_id=meta.get("tokenizer.ggml.padding_token_id"),
                        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
                        chat_template=meta.get("tokenizer.chat_template"))
