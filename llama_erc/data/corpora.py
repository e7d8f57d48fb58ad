"""The dataset registry: every ERC corpus the project reads, one row each, and `load_dialogues`.

A corpus is one reader module (reader + label tuple) plus one row of CORPORA. Everything else that depends on
which corpora exist is derived from the rows, never listed again: the KIND of a `KIND=PATH` data spec
(ERC_KINDS; DATA_KINDS adds `prompts`, the generic prompt/response JSONL), the label set a decoder chooses from,
the name a prompt gives the dataset and the word that answers each label.

    dialogues = load_dialogues("meld", "../shared/data/meld", "train")
    corpus("emorynlp").labels        # ("Joyful", "Mad", ...), the corpus' own spelling
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from llama_erc.data.emorynlp import EMORYNLP_LABELS, read_emorynlp
from llama_erc.data.iemocap import IEMOCAP_LABELS, read_iemocap
from llama_erc.data.jsonl import read_jsonl_dialogues
from llama_erc.data.meld import MELD_LABELS, read_meld
from llama_erc.data.schema import DataError, Dialogue, check_split


@dataclass(frozen=True)
class Corpus:
    kind: str                                   # the KIND of a KIND=PATH data spec
    name: str                                   # how a prompt names the dataset ("... in this MELD conversation")
    read: Callable[[Path, str], list[Dialogue]]  # (path, split) -> the split's dialogues
    labels: tuple[str, ...] | None = None       # canonical labels; None: the train split's emotions (generic JSONL)
    label_words: Mapping[str, str] = field(default_factory=dict)  # {label: answer word}; a missing label: lower-cased
    path_is_dir: bool = True                    # the path is the dataset directory (else a file or a directory)
    drops_turns: bool = False  # the reader drops some turns (IEMOCAP: labels outside its 6 classes), so a knowledge
    #                            sidecar may name utterances the dialogues do not have

    def words(self, labels: tuple[str, ...]) -> dict[str, str]:
        """{label: answer word} for `labels` (the corpus' own, or a JSONL corpus' train emotions)."""
        return {label: self.label_words.get(label, label.lower()) for label in labels}


CORPORA: dict[str, Corpus] = {c.kind: c for c in (
    Corpus("meld", "MELD", read_meld, MELD_LABELS),
    Corpus("emorynlp", "EmoryNLP", read_emorynlp, EMORYNLP_LABELS),
    Corpus("iemocap", "IEMOCAP", read_iemocap, IEMOCAP_LABELS,
           {"hap": "happy", "sad": "sad", "neu": "neutral", "ang": "angry", "exc": "excited", "fru": "frustrated"},
           drops_turns=True),
    # any other corpus, one dialogue per line (jsonl.py); its label set is its train split's emotions
    Corpus("jsonl", "jsonl", read_jsonl_dialogues, path_is_dir=False),
)}
ERC_KINDS = tuple(CORPORA)
PROMPTS_KIND = "prompts"  # a JSONL of {"prompt", "response"} rows: supervised training data with no dialogues
DATA_KINDS = ERC_KINDS + (PROMPTS_KIND,)
LABELS: dict[str, tuple[str, ...]] = {k: c.labels for k, c in CORPORA.items() if c.labels is not None}


def corpus(kind: str) -> Corpus:
    if kind not in CORPORA:
        raise DataError(f"unknown dataset kind {kind!r}; expected one of {', '.join(ERC_KINDS)}")
    return CORPORA[kind]


def fixed_labels(dataset: str) -> tuple[str, ...] | None:
    """The registry's label set of a dataset; None for a corpus without one, or a name the registry lacks."""
    return CORPORA[dataset].labels if dataset in CORPORA else None


def display_name(dataset: str) -> str:
    """How prompts name a dataset: the registry's name, else the dataset's own name."""
    return CORPORA[dataset].name if dataset in CORPORA else dataset


def default_label_words(dataset: str, labels: tuple[str, ...]) -> dict[str, str]:
    """{label: answer word}: the registry's words for a known corpus, else each label lower-cased."""
    return CORPORA[dataset].words(labels) if dataset in CORPORA else {label: label.lower() for label in labels}


def load_dialogues(kind: str, path: str | Path, split: str, *,
                   labels: tuple[str, ...] | None = None) -> list[Dialogue]:
    """Dialogues of one split of a corpus.

    Args:
        kind: one of ERC_KINDS.
        path: the dataset directory (for jsonl: a file or a directory, see data/jsonl.py).
        split: "train" | "dev" | "test".
        labels: corpora without a fixed label set (jsonl) only: the allowed emotions (default: the train split's).
    """
    check_split(split)
    c = corpus(kind)
    if labels is not None and c.labels is not None:
        raise DataError(f"labels= applies to corpora without a fixed label set; {kind} has one")
    path = Path(path)
    if c.path_is_dir and not path.is_dir():
        raise DataError(f"{path}: not a directory; {kind} expects the dataset directory")
    return c.read(path, split) if labels is None else c.read(path, split, labels)
