"""The tokenizer interface every backend implements, and the helpers the backends share.

Every backend has:
    encode(text, bos=False, eos=False) -> ids   the reference tokenizer's ids for `text` without special tokens;
                                                bos=True prepends bos_id only where the model adds one (add_bos)
    encode_special(text) -> ids                 each exact special-token string -> its id, the rest via encode
    decode(ids) -> str                          special tokens (BOS/EOS/pad/control) decode to nothing
    bos_id (int | None), eos_id, pad_id, vocab_size (max id + 1, special tokens included), add_bos,
    dummy_prefix (encode prepends a space, as SentencePiece's "\u2581" does), special_tokens ({string: id}),
    chat_template (str | None), path, kind

The boundary fact the prompts rely on: with dummy_prefix, `encode(prompt) + encode(word)` equals
`encode(prompt + " " + word)`; without it (byte-level BPE), `encode(prompt) + encode(" " + word)` does.
"""
from __future__ import annotations

import importlib
import re
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

from llama_erc.data.schema import DataError

def require(module: str, path: Path) -> ModuleType:
    """Import an optional package, or fail naming the file that needs it and the extra that installs it (each
    optional package is an extra of the same name in setup.py)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(f"{path} needs the {module!r} package: pip install 'llama-lora-erc[{module}]' "
                        f"(from a checkout: pip install -e '.[{module}]')") from None


def split_specials(text: str, special_tokens: dict[str, int]) -> list[str | int]:
    """`text` cut at every exact occurrence of a special-token string: the text between them and the ids
    (longest string first, so "<|reserved_special_token_10|>" is not read as "..._1" plus text)."""
    if not special_tokens or not text:
        return [text] if text else []
    pattern = "|".join(re.escape(s) for s in sorted(special_tokens, key=len, reverse=True))
    parts: list[str | int] = []
    pos = 0
    for m in re.finditer(pattern, text):
        if m.start() > pos:
            parts.append(text[pos:m.start()])
        parts.append(special_tokens[m.group()])
        pos = m.end()
    if pos < len(text):
        parts.append(text[pos:])
    return parts


class Tokenizer:
    """The shared half of the interface; a backend sets the attributes and implements `_encode` and `_decode`."""

    kind: str
    path: Path
    bos_id: int | None
    eos_id: int
    pad_id: int
    vocab_size: int
    add_bos: bool
    dummy_prefix: bool
    special_tokens: dict[str, int]
    chat_template: str | None = None

    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def _decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Ids of plain `text`; special-token strings inside it are encoded as ordinary text."""
        head = [self.bos_id] if bos and self.add_bos and self.bos_id is not None else []
        return head + self._encode(text) + [self.eos_id] * eos

    def encode_special(self, text: str) -> list[int]:
        """Ids of `text` where every exact special-token string is that token; no BOS/EOS added. Each stretch
        of text between them is encoded on its own, as chat templates do (with dummy_prefix each gets a "▁")."""
        return [i for part in split_specials(text, self.special_tokens)
                for i in ([part] if isinstance(part, int) else self._encode(part))]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`. Special tokens and the pad id decode to nothing, so padded rows decode cleanly: when
        pad is a fallback id (<unk> for LLaMA 2), dropping it loses nothing, as byte fallback means encode
        never produces <unk>."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids out of range [0, {self.vocab_size}): {bad[:5]}")
        return self._decode([i for i in ids if i != self.pad_id])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, kind={self.kind!r}, vocab_size={self.vocab_size})"
