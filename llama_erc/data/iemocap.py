"""IEMOCAP reader: the licensed release's own layout -> list[Dialogue], 6-class ERC labels.

Layout under the root (IEMOCAP_full_release/):
    Session{1..5}/dialog/transcriptions/<dialogue>.txt   one turn per line:
        Ses01F_impro01_F000 [006.2901-008.2357]: text of the turn
    Session{1..5}/dialog/EmoEvaluation/<dialogue>.txt    one block per turn, first line tab-separated:
        [6.2901 - 8.2357]	Ses01F_impro01_F000	neu	[2.5000, 2.5000, 2.5000]
        followed by per-annotator lines (C-E1:, A-E3:, ...) that are not needed here.
A dialogue is one transcription file, its turns sorted by start time (a stable sort, so ties keep file order):
file order is not guaranteed to be time order, and the usual ERC preprocessing re-sorts by time. The speaker is
the gender letter that opens the turn's last id component ("F" or "M"). Turns whose consensus label is not
one of hap, sad, neu, ang, exc, fru (sur, fea, dis, oth, xxx) are dropped entirely, as in the usual ERC
preprocessing; a dialogue left with no turns is skipped. Transcript lines that are not turns (not starting
with "Ses") are ignored, and so are the few turns the evaluation file does not label; a label for a turn that
is not in the transcript, or an evaluation file with no labels at all, is an error.

Splits: Session 5 is test. Sessions 1-4 are train and dev: their dialogues sorted by id, every 10th one
(positions 0, 10, 20, ...) is dev, so dev holds whole dialogues and never shares one with train.
"""
from __future__ import annotations

import re
from pathlib import Path

from llama_erc.data.files import read_text
from llama_erc.data.schema import DataError, Dialogue, check_split, make_utterance, where

IEMOCAP_LABELS = ("hap", "sad", "neu", "ang", "exc", "fru")   # the usual 6-class ERC set
IEMOCAP_ALL_LABELS = ("neu", "fru", "ang", "sad", "hap", "exc", "sur", "fea", "dis", "oth", "xxx")
IEMOCAP_DEV_EVERY = 10           # every 10th train-session dialogue (sorted by id) is dev
_TRAIN_SESSIONS, _TEST_SESSIONS = (1, 2, 3, 4), (5,)
_TURN = re.compile(r"^(?P<turn>Ses\S+)\s+\[(?P<start>\d+(?:\.\d*)?)\s*-\s*(?P<end>\d+(?:\.\d*)?)\]:\s*(?P<text>.*)$")
_EVAL = re.compile(r"^\[\s*[\d.]+\s*-\s*[\d.]+\s*\]\s+(?P<turn>\S+)\s+(?P<label>\S+)")


def _read_labels(path: Path) -> dict[str, str]:
    labels: dict[str, str] = {}
    for line, text in enumerate(read_text(path).split("\n"), start=1):
        text = text.strip()
        if not text.startswith("["):
            continue   # header (%), blank separators and per-annotator lines
        m = _EVAL.match(text)
        if m is None:
            raise DataError(f"{where(path, line)}: malformed evaluation line, expected "
                            "'[start - end]<TAB>turn<TAB>label<TAB>[v, a, d]'")
        label = m["label"].lower()
        if label not in IEMOCAP_ALL_LABELS:
            raise DataError(f"{where(path, line)}: unknown IEMOCAP label {m['label']!r}; "
                            f"expected one of {IEMOCAP_ALL_LABELS}")
        if m["turn"] in labels:
            raise DataError(f"{where(path, line)}: turn {m['turn']} labelled twice")
        labels[m["turn"]] = label
    return labels


def read_iemocap_dialogue(transcript: Path, evaluation: Path) -> Dialogue | None:
    """One dialogue from its transcription and EmoEvaluation files; None when no 6-class turn is left."""
    labels = _read_labels(evaluation)
    timed, seen = [], set()   # (start seconds, utterance), in file order
    for line, text in enumerate(read_text(transcript).split("\n"), start=1):
        text = text.strip()
        if not text.startswith("Ses"):
            continue
        m = _TURN.match(text)
        if m is None:
            raise DataError(f"{where(transcript, line)}: malformed turn, expected 'TURN_ID [start-end]: text'")
        turn = m["turn"]
        seen.add(turn)
        if labels.get(turn) not in IEMOCAP_LABELS:
            continue   # outside the 6 classes, or one of the few unannotated turns (ids with "XX")
        speaker = turn.rsplit("_", 1)[-1][:1].upper()
        if speaker not in ("F", "M"):
            raise DataError(f"{where(transcript, line)}: cannot read the speaker (F/M) from turn id {turn}")
        timed.append((float(m["start"]), make_utterance(speaker, m["text"], labels[turn], IEMOCAP_LABELS,
                                                        where(transcript, line), utterance_id=turn)))
    unknown = sorted(set(labels) - seen)
    if unknown:   # the two files do not describe the same dialogue
        raise DataError(f"{evaluation}: labelled turn(s) {unknown[:5]} not in {transcript}")
    if seen and not labels:
        raise DataError(f"{evaluation}: no labelled turns for the {len(seen)} turns of {transcript}")
    # sorted() is stable: turns with the same start time stay in file order
    utterances = tuple(u for _, u in sorted(timed, key=lambda t: t[0]))
    return Dialogue(transcript.stem, utterances) if utterances else None


def _read_session(root: Path, session: int) -> list[Dialogue]:
    base = root / f"Session{session}" / "dialog"
    transcripts = sorted((base / "transcriptions").glob("*.txt"))
    if not transcripts:
        raise DataError(f"{base / 'transcriptions'}: no transcription files (*.txt); is {root} the "
                        "IEMOCAP_full_release directory?")
    dialogues = [read_iemocap_dialogue(t, base / "EmoEvaluation" / t.name) for t in transcripts]
    return [d for d in dialogues if d is not None]


def read_iemocap(root: str | Path, split: str) -> list[Dialogue]:
    """`root` holds Session1..Session5. Dialogues sorted by id."""
    check_split(split)
    root = Path(root)
    sessions = _TEST_SESSIONS if split == "test" else _TRAIN_SESSIONS
    dialogues = sorted((d for s in sessions for d in _read_session(root, s)), key=lambda d: d.dialogue_id)
    if split == "test":
        return dialogues
    is_dev = split == "dev"
    return [d for i, d in enumerate(dialogues) if (i % IEMOCAP_DEV_EVERY == 0) == is_dev]
