"""One schema for every ERC corpus: a Dialogue is an ordered tuple of Utterances, each with a gold emotion.

Readers (meld.py, emorynlp.py, iemocap.py, jsonl.py) return `list[Dialogue]` and never tokenize. Each reader
module holds its corpus' label set, a constant tuple in the dataset's own spelling (checked against the shared
copies of MELD and EmoryNLP); the registry (corpora.py) lists them.
Every piece of text goes through `normalize_text` so that the same utterance reads the same whichever copy
of a corpus it came from.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path


class DataError(ValueError):
    """Bad or missing input data. The message names the file (and the line or JSON path where known)."""


@dataclass(frozen=True)
class Utterance:
    speaker: str
    text: str
    emotion: str                      # canonical spelling from the dataset's label tuple
    utterance_id: str | None = None   # the corpus' own id (MELD Utterance_ID, EmoryNLP/IEMOCAP turn id)
    knowledge: str | None = None      # supplementary text, e.g. a description of the video clip


@dataclass(frozen=True)
class Dialogue:
    dialogue_id: str
    utterances: tuple[Utterance, ...]


SPLITS = ("train", "dev", "test")


def where(path: str | Path, line: int | str | None = None) -> str:
    """'file:line' for error messages."""
    return f"{path}:{line}" if line is not None else str(path)


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")


def canonical_label(raw: str, labels: tuple[str, ...], at: str) -> str:
    """Map `raw` onto the label tuple, ignoring case and surrounding blanks; anything else is an error,
    so a typo or a new label can never become a silent extra class."""
    key = raw.strip().lower()
    for label in labels:
        if label.lower() == key:
            return label
    raise DataError(f"{at}: unknown emotion label {raw!r}; expected one of {labels}")


# Typographic punctuation -> ASCII. MELD's CSVs use ’ ‘ “ ” … — (see shared/data/meld/README.md); the
# ASCII forms tokenize into common pieces and match the other corpora, which are plain ASCII.
_PUNCT = str.maketrans({
    "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u2032": "'",
    "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u2033": '"',
    "\u2013": "-", "\u2014": "-", "\u2212": "-",
    "\u00a0": " ", "\u200b": None, "\ufeff": None,
})
# UTF-8 read as cp1252 ("â€™" for ’): a UTF-8 lead byte followed by as many continuation bytes (0x80-0xBF)
# as it announces, each shown as its cp1252 character. Repaired one sequence at a time, so text that mixes
# clean and double-encoded characters is fixed too.
_CONT = ("[\u00a0-\u00bf\u20ac\u201a\u0192\u201e\u2026\u2020\u2021\u02c6\u2030\u0160\u2039\u0152"
         "\u017d\u2018\u2019\u201c\u201d\u2022\u2013\u2014\u02dc\u2122\u0161\u203a\u0153\u017e\u0178"
         "\u0081\u008d\u008f\u0090\u009d]")
_MOJIBAKE = re.compile(f"[\u00c2-\u00df]{_CONT}|[\u00e0-\u00ef]{_CONT}{{2}}|[\u00f0-\u00f4]{_CONT}{{3}}")
_C1 = re.compile("[\u0080-\u009f]")
_SPACES = re.compile(r"\s+")


def _undo_mojibake(match: re.Match) -> str:
    try:
        return match.group().encode("cp1252").decode("utf-8")
    except UnicodeError:   # not a double-encoded character after all: keep it as it is
        return match.group()


def _c1_to_cp1252(match: re.Match) -> str:
    # COSMIC's meld.pkl stores ’ as the C1 control \x92: it is the cp1252 byte, so decode it as such.
    try:
        return bytes([ord(match.group())]).decode("cp1252")
    except UnicodeDecodeError:   # 0x81, 0x8d, 0x8f, 0x90, 0x9d are unassigned in cp1252
        return ""


def normalize_text(text: str) -> str:
    """The one text normalisation for every reader: repair mojibake and C1 controls, map typographic
    punctuation to ASCII, NFC-compose, collapse whitespace runs (MELD has double spaces) and strip."""
    text = _MOJIBAKE.sub(_undo_mojibake, text)
    text = _C1.sub(_c1_to_cp1252, text)
    text = unicodedata.normalize("NFC", text).translate(_PUNCT).replace("\u2026", "...")
    return _SPACES.sub(" ", text).strip()


def make_utterance(speaker: str, text: str, emotion: str, labels: tuple[str, ...], at: str,
                   utterance_id: str | None = None, knowledge: str | None = None) -> Utterance:
    """Validated Utterance: normalised speaker and text (text must not be empty), canonical label."""
    text = normalize_text(text)
    if not text:
        raise DataError(f"{at}: empty utterance text")
    knowledge = normalize_text(knowledge) if knowledge is not None else None
    return Utterance(speaker=normalize_text(speaker), text=text,
                     emotion=canonical_label(emotion, labels, at),
                     utterance_id=utterance_id, knowledge=knowledge or None)


def dialogue_labels(dialogues: list[Dialogue]) -> tuple[str, ...]:
    """The sorted set of emotions that occur: the label set of a generic (JSONL) corpus' train split."""
    return tuple(sorted({u.emotion for d in dialogues for u in d.utterances}))
