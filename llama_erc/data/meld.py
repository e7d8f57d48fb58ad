"""MELD reader: the official `{train,dev,test}_sent_emo.csv` files -> list[Dialogue].

Columns: Sr No., Utterance, Speaker, Emotion, Sentiment, Dialogue_ID, Utterance_ID, Season, Episode, StartTime,
EndTime. Rows are grouped by Dialogue_ID and ordered by Utterance_ID; both are integers with gaps (train
dialogue 60 does not exist, ~80 dialogues skip utterance ids), so neither is assumed contiguous.
Dialogue ids are the decimal Dialogue_ID ("0", "1", ...), utterance ids the decimal Utterance_ID.
"""
from __future__ import annotations

from pathlib import Path

from llama_erc.data.files import parse_int, read_csv_rows
from llama_erc.data.schema import DataError, Dialogue, Utterance, check_split, make_utterance, where

MELD_LABELS = ("neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger")
MELD_FILES = {"train": "train_sent_emo.csv", "dev": "dev_sent_emo.csv", "test": "test_sent_emo.csv"}
_REQUIRED = ("Utterance", "Speaker", "Emotion", "Dialogue_ID", "Utterance_ID")


def read_meld_csv(path: str | Path) -> list[Dialogue]:
    """Dialogues of one MELD CSV, sorted by Dialogue_ID, utterances sorted by Utterance_ID."""
    path = Path(path)
    groups: dict[int, dict[int, Utterance]] = {}
    first_line: dict[tuple[int, int], int] = {}
    for line, row in read_csv_rows(path, _REQUIRED):
        at = where(path, line)
        dia = parse_int(row["Dialogue_ID"], "Dialogue_ID", at)
        utt = parse_int(row["Utterance_ID"], "Utterance_ID", at)
        if (dia, utt) in first_line:
            raise DataError(f"{at}: duplicate (Dialogue_ID, Utterance_ID) = ({dia}, {utt}), "
                            f"first seen on line {first_line[dia, utt]}")
        first_line[dia, utt] = line
        groups.setdefault(dia, {})[utt] = make_utterance(
            row["Speaker"], row["Utterance"], row["Emotion"], MELD_LABELS, at, utterance_id=str(utt))
    return [Dialogue(str(dia), tuple(utts[u] for u in sorted(utts))) for dia, utts in sorted(groups.items())]


def read_meld(root: str | Path, split: str) -> list[Dialogue]:
    """`root` is the directory holding the three official CSVs."""
    check_split(split)
    return read_meld_csv(Path(root) / MELD_FILES[split])
