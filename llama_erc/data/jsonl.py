"""The generic JSONL reader, for any ERC corpus without a reader of its own: one dialogue per line,
    {"dialogue_id": "d1", "split": "train", "utterances": [
        {"speaker": "A", "text": "...", "emotion": "joy", "utterance_id": "optional", "knowledge": "optional"}]}
`path` is either a file holding every split (each line's "split" field picks the lines of the requested split
and is required), or a directory holding `train.jsonl`, `dev.jsonl`, `test.jsonl` (there "split" is optional
but, when present, must match the file). A missing utterance_id becomes the utterance's 0-based position.
The label set of a JSONL corpus is `labels=` when given, else the emotions of its train split: a dev/test
emotion never seen in train is an error, never a new class.
"""
from __future__ import annotations

from pathlib import Path

from llama_erc.data.files import read_jsonl
from llama_erc.data.schema import DataError, Dialogue, check_split, dialogue_labels, make_utterance, where


def _str_field(obj: dict, key: str, at: str, required: bool = True) -> str | None:
    value = obj.get(key)
    if value is None and not required:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)   # numeric ids are common; labels and text must be strings
    if not isinstance(value, str) or (required and not value.strip()):
        raise DataError(f"{at}: {key!r} must be a non-empty string, got {value!r}")
    return value


def _split_file(path: Path, split: str) -> tuple[Path, bool]:
    """(file to read, whether its lines must carry a matching "split")."""
    if path.is_dir():
        return path / f"{split}.jsonl", False
    if path.is_file():
        return path, True
    raise DataError(f"{path}: no such JSONL file or directory")


def _read_jsonl_lines(path: Path, split: str, labels: tuple[str, ...] | None) -> list[Dialogue]:
    file, filter_by_split = _split_file(path, split)
    dialogues, first_line = [], {}
    for line, obj in read_jsonl(file):
        at = where(file, line)
        line_split = _str_field(obj, "split", at, required=filter_by_split)
        if line_split is not None and line_split not in ("train", "dev", "test"):
            raise DataError(f"{at}: unknown split {line_split!r}")
        if filter_by_split and line_split != split:
            continue
        if not filter_by_split and line_split is not None and line_split != split:
            raise DataError(f"{at}: line says split {line_split!r} but the file is {file.name}")
        dialogue_id = _str_field(obj, "dialogue_id", at)
        if dialogue_id in first_line:
            raise DataError(f"{at}: duplicate dialogue_id {dialogue_id!r} (first on line {first_line[dialogue_id]})")
        first_line[dialogue_id] = line
        turns = obj.get("utterances")
        if not isinstance(turns, list) or not turns:
            raise DataError(f"{at}: dialogue {dialogue_id!r} needs a non-empty 'utterances' list")
        utterances = []
        for i, u in enumerate(turns):
            at_u = f"{at}: utterances[{i}]"
            if not isinstance(u, dict):
                raise DataError(f"{at_u}: expected an object, got {type(u).__name__}")
            emotion = _str_field(u, "emotion", at_u)
            utterances.append(make_utterance(
                _str_field(u, "speaker", at_u), _str_field(u, "text", at_u), emotion,
                labels if labels is not None else (emotion.strip(),), at_u,
                utterance_id=_str_field(u, "utterance_id", at_u, required=False) or str(i),
                knowledge=_str_field(u, "knowledge", at_u, required=False)))
        dialogues.append(Dialogue(dialogue_id, tuple(utterances)))
    return dialogues


def read_jsonl_dialogues(path: str | Path, split: str, labels: tuple[str, ...] | None = None) -> list[Dialogue]:
    """Dialogues of one split of a generic JSONL corpus, in file order."""
    check_split(split)
    path = Path(path)
    if labels is None and split != "train":
        labels = dialogue_labels(_read_jsonl_lines(path, "train", None))
        if not labels:
            raise DataError(f"{path}: no train dialogues to take the label set from; pass labels=")
    return _read_jsonl_lines(path, split, tuple(labels) if labels is not None else None)
