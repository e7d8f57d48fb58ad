"""Tokenizers: one interface over four file formats, and `load_tokenizer(path)`, which picks the backend.

    tok = load_tokenizer("/models/llama-2-7b")     # a file, or a checkpoint directory holding one
    ids = tok.encode(utterance)                    # plain text: "<|im_end|>" in it is text, never a control token
    ids = tok.encode_special("<|im_start|>user\n") # chat scaffolding: special-token strings become their ids

Backends (`tok.kind`): "sentencepiece" (LLaMA 2's `tokenizer.model`, or one made by `train_tokenizer`; this module),
"tiktoken" (Meta's Llama 3 `tokenizer.model`; data/tokenizer_tiktoken.py), "hf" (a `tokenizer.json`) and "gguf"
(the vocabulary embedded in a GGUF file) (both data/tokenizer_bpe.py). The last three need the optional `formats`
extra (`tiktoken`, `tokenizers`, `gguf`), imported only when such a file is loaded.

Every backend has:
    encode(text, bos=False, eos=False) -> ids   the reference tokenizer's ids for `text` without special tokens;
                                                bos=True prepends bos_id only where the model adds one (add_bos)
    encode_special(text) -> ids                 each exact special-token string -> its id, the rest via encode
    decode(ids) -> str                          special tokens (BOS/EOS/pad/control) decode to nothing
    bos_id (int | None), eos_id, pad_id, vocab_size (max id + 1, special tokens included), add_bos,
    dummy_prefix (encode prepends a space, as SentencePiece's "▁" does), special_tokens ({string: id}),
    chat_template (str | None), path, kind

The boundary fact the prompts rely on: with dummy_prefix, `encode(prompt) + encode(word)` equals
`encode(prompt + " " + word)`; without it (byte-level BPE), `encode(prompt) + encode(" " + word)` does.
LLaMA 2: 32,000 pieces, unk=0, bos=1, eos=2, no pad piece (pad_id() == -1), so pad falls back to PAD_FALLBACK_ID.
"""
from __future__ import annotations

import importlib
import io
import re
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

import sentencepiece as spm

from data.schema import DataError

# LLaMA 2 has no pad piece, so batches are right-padded with <unk> (id 0) unless the model defines a pad
# piece. Pad positions are always masked (labels -100, attention lengths), so the id never reaches a loss
# or an attention score; it only has to be a valid embedding row.
PAD_FALLBACK_ID = 0
N_SPECIAL = 3      # <unk>, <s>, </s> at ids 0, 1, 2, as in LLaMA 2
N_BYTES = 256      # byte-fallback pieces <0x00>..<0xFF>
DIR_LOOKUP = ("tokenizer.json", "tokenizer.model", "*.gguf")    # what load_tokenizer(dir) looks for, in order


def require(module: str, path: Path) -> ModuleType:
    """Import an optional package (the `formats` extra), or fail naming the file that needs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(f"{path} needs the {module!r} package: pip install -e '.[formats]'") from None


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


class BaseTokenizer:
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


class Tokenizer(BaseTokenizer):
    """SentencePiece backend (LLaMA 2's `tokenizer.model`, or one trained by `train_tokenizer`). SentencePiece
    never matches control pieces (<s>, </s>) in input text, so `encode` needs no special handling."""

    kind = "sentencepiece"

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: tokenizer model not found")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise DataError(f"{path}: not a valid SentencePiece model ({e})") from None
        self.path = path
        self.vocab_size: int = self.sp.vocab_size()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.pad_id: int = self.sp.pad_id() if self.sp.pad_id() >= 0 else PAD_FALLBACK_ID
        if self.bos_id < 0 or self.eos_id < 0:
            raise DataError(f"{path}: the model defines no BOS/EOS piece (bos={self.bos_id}, eos={self.eos_id})")
        self.add_bos = True    # LLaMA 2's convention: every sequence starts with <s>
        self.dummy_prefix = self.sp.EncodeAsPieces("a")[0].startswith("\u2581")   # normalizer add_dummy_prefix
        self.special_tokens = {self.sp.IdToPiece(i): i for i in range(self.vocab_size)
                               if self.sp.IsControl(i) or self.sp.IsUnknown(i)}
        self.chat_template = None

    def _encode(self, text: str) -> list[int]:
        return self.sp.EncodeAsIds(text)

    def _decode(self, ids: list[int]) -> str:
        return self.sp.DecodeIds(ids)     # control pieces decode to nothing

    def piece(self, token_id: int) -> str:
        return self.sp.IdToPiece(int(token_id))


SentencePieceTokenizer = Tokenizer


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


def load_tokenizer(path: str | Path) -> BaseTokenizer:
    """The tokenizer in `path`: a tokenizer file, or a directory holding one (see DIR_LOOKUP)."""
    path = Path(path)
    if path.is_dir():
        path = find_tokenizer_file(path)
    elif not path.is_file():
        raise DataError(f"{path}: no such tokenizer file or directory")
    kind = _sniff(path)
    if kind == "sentencepiece":
        return Tokenizer(path)
    if kind == "tiktoken":
        from data.tokenizer_tiktoken import TiktokenTokenizer
        return TiktokenTokenizer(path)
    from data.tokenizer_bpe import load_gguf_tokenizer, load_hf_tokenizer
    return load_gguf_tokenizer(path) if kind == "gguf" else load_hf_tokenizer(path)


def train_tokenizer(texts: Iterable[str], vocab_size: int, path: str | Path) -> Tokenizer:
    """Train a LLaMA-style BPE model on `texts`, write it to `path` and load it.

    LLaMA-style: byte fallback (no true <unk> on any input), ids unk=0 bos=1 eos=2, no pad piece (pad falls
    back to PAD_FALLBACK_ID like LLaMA 2), identity normalisation, digits split. Deterministic: one thread,
    no sampling or shuffling of the input. `hard_vocab_limit=False` lets a corpus too small for `vocab_size`
    give fewer pieces instead of failing: read the real size from `.vocab_size`.
    """
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError("train_tokenizer: no non-empty texts to train on")
    if vocab_size < N_SPECIAL + N_BYTES + 1:
        raise ValueError(f"train_tokenizer: vocab_size {vocab_size} is too small; byte fallback alone needs "
                         f"{N_SPECIAL + N_BYTES} pieces (3 specials + 256 bytes), so use at least "
                         f"{N_SPECIAL + N_BYTES + 1}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.Train(
            sentence_iterator=iter(texts), model_writer=model, model_type="bpe", vocab_size=vocab_size,
            hard_vocab_limit=False, byte_fallback=True, character_coverage=0.99995,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            normalization_rule_name="identity", add_dummy_prefix=True, remove_extra_whitespaces=False,
            split_digits=True, allow_whitespace_only_pieces=True,
            num_threads=1, input_sentence_size=0, shuffle_input_sentence=False, minloglevel=2,
        )
    except RuntimeError as e:
        # Each distinct character of the corpus needs its own piece on top of the 259 fixed ones.
        n_chars = len({c for t in texts for c in t.replace(" ", "\u2581")})
        raise ValueError(f"train_tokenizer: sentencepiece failed for vocab_size={vocab_size} on {len(texts)} "
                         f"texts with {n_chars} distinct characters; try vocab_size >= "
                         f"{N_SPECIAL + N_BYTES + n_chars + 1}. ({e})") from None
    path.write_bytes(model.getvalue())
    return Tokenizer(path)
