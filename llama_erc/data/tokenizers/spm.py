"""SentencePiece backend: LLaMA 2's `tokenizer.model`, or a LLaMA-style BPE model trained by `train_tokenizer`.

LLaMA 2: 32,000 pieces, unk=0, bos=1, eos=2, no pad piece (pad_id() == -1), so pad falls back to PAD_FALLBACK_ID.
"""
from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

from llama_erc.data.schema import DataError
from llama_erc.data.tokenizers.base import Tokenizer

# LLaMA 2 has no pad piece, so batches are right-padded with <unk> (id 0) unless the model defines a pad
# piece. Pad positions are always masked (labels -100, attention lengths), so the id never reaches a loss
# or an attention score; it only has to be a valid embedding row.
PAD_FALLBACK_ID = 0
N_SPECIAL = 3      # <unk>, <s>, </s> at ids 0, 1, 2, as in LLaMA 2
N_BYTES = 256      # byte-fallback pieces <0x00>..<0xFF>


class SentencePieceTokenizer(Tokenizer):
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


def train_tokenizer(texts: Iterable[str], vocab_size: int, path: str | Path) -> SentencePieceTokenizer:
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
    return SentencePieceTokenizer(path)
