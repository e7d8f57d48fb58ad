"""Meta's Llama 3 `tokenizer.model`: tiktoken's format (one `base64(token bytes) rank` line per token) plus the
256 special tokens Meta's reference tokenizer places right after the base ranks, split by Meta's regex.

Layout of the specials (ids n_base + 0 .. n_base + 255; Llama 3 has n_base = 128,000):
    0 <|begin_of_text|> (BOS)   1 <|end_of_text|> (EOS)   2-5 <|reserved_special_token_0..3|>
    6 <|start_header_id|>   7 <|end_header_id|>   8 <|reserved_special_token_4|>   9 <|eot_id|> (end of turn)
    10-255 <|reserved_special_token_5..250|>
This is the Llama 3 release's layout. Llama 3.1 renamed some reserved slots (<|eom_id|> at 8, <|python_tag|> at
10, ...) but kept every id above, and the two share the same file, which cannot tell them apart.
"""
from __future__ import annotations

import base64
import binascii
from pathlib import Path

from llama_erc.data.schema import DataError
from llama_erc.data.tokenizers.base import Tokenizer, require

# Meta's pre-tokenizer: contractions (any case), words with one leading non-letter, numbers of at most 3
# digits, punctuation runs with their trailing newlines, newline runs, other whitespace.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
N_SPECIAL = 256
_NAMED = ("<|begin_of_text|>", "<|end_of_text|>", *(f"<|reserved_special_token_{i}|>" for i in range(4)),
          "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>")


def llama3_special_names() -> list[str]:
    """The 256 special-token strings, in id order after the base ranks."""
    return [*_NAMED, *(f"<|reserved_special_token_{i}|>" for i in range(5, 5 + N_SPECIAL - len(_NAMED)))]


def read_ranks(path: Path) -> dict[bytes, int]:
    """`{token bytes: rank}` from tiktoken lines; a malformed line is an error naming the line."""
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise DataError(f"{path}:{n}: not a tiktoken line (base64 token, space, rank): {line[:60]!r}") from None
    if not ranks:
        raise DataError(f"{path}: no tiktoken ranks")
    return ranks


class TiktokenTokenizer(Tokenizer):
    """Llama 3 through `tiktoken.Encoding`. Plain `encode` passes `disallowed_special=()`, so special strings in
    the text are encoded as ordinary text (Meta's default); specials decode to nothing."""

    kind = "tiktoken"

    def __init__(self, path: str | Path):
        path = Path(path)
        tiktoken = require("tiktoken", path)
        ranks = read_ranks(path)
        n_base = max(ranks.values()) + 1     # == len(ranks) for Meta's file, whose ranks are 0..n-1
        self.special_tokens = {s: n_base + i for i, s in enumerate(llama3_special_names())}
        try:
            self.enc = tiktoken.Encoding(name=path.name, pat_str=LLAMA3_SPLIT, mergeable_ranks=ranks,
                                         special_tokens=self.special_tokens)
        except ValueError as e:
            raise DataError(f"{path}: not a usable tiktoken model ({e})") from None
        self.path = path
        self.vocab_size = n_base + N_SPECIAL
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.pad_id = self.eos_id      # Meta defines no pad token (pad_id -1); pad positions are masked anyway
        self.add_bos = True
        self.dummy_prefix = False
        self.chat_template = None
        self._special_ids = set(self.special_tokens.values())

    def _encode(self, text: str) -> list[int]:
        return self.enc.encode(text, allowed_special=set(), disallowed_special=())

    def _decode(self, ids: list[int]) -> str:
        return self.enc.decode([i for i in ids if i not in self._special_ids])

    def piece(self, token_id: int) -> str:
        return self.enc.decode_single_token_bytes(int(token_id)).decode("utf-8", errors="replace")
