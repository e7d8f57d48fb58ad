"""Supplementary knowledge sidecar: text attached to utterances (DialogueLLM used a text description of each
utterance's video clip). The sidecar is a CSV with header `dataset,dialogue_id,utterance_id,knowledge` and an
optional `split` column, or a JSONL file with those keys per line (chosen by the extension: .csv or .jsonl).
MELD numbers its dialogues per split (train dialogue 0 and dev dialogue 0 are different clips), so MELD rows
must name their split and `attach_knowledge` must be told which split it is attaching to.

Ids are the readers' own: MELD "12"/"3" (Dialogue_ID/Utterance_ID), EmoryNLP "s01_e02_c03"/"s01_e02_c03_u004",
IEMOCAP "Ses01F_impro01"/"Ses01F_impro01_F000", JSONL its dialogue_id and utterance_id (or position).
One sidecar may cover several datasets and every split: rows of other datasets, and rows of dialogues that
are not in the given list (another split), are skipped. A row naming a loaded dialogue but an utterance it
does not have (unless allow_missing_utterances), a duplicate key, or a sidecar where nothing matches at all
is an error.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from llama_erc.data.files import read_csv_rows, read_jsonl
from llama_erc.data.schema import SPLITS, DataError, Dialogue, normalize_text, where

KNOWLEDGE_COLUMNS = ("dataset", "dialogue_id", "utterance_id", "knowledge")


def read_knowledge(path: str | Path, dataset: str,
                   split: str | None = None) -> dict[tuple[str, str], tuple[str, str]]:
    """{(dialogue_id, utterance_id): (knowledge, 'file:line')} for one dataset (and split, where rows have one)."""
    path = Path(path)
    if path.suffix == ".csv":
        rows = read_csv_rows(path, KNOWLEDGE_COLUMNS)
    elif path.suffix == ".jsonl":
        rows = read_jsonl(path)
    else:
        raise DataError(f"{path}: knowledge sidecar must be .csv or .jsonl")
    table: dict[tuple[str, str], tuple[str, str]] = {}
    for line, row in rows:
        at = where(path, line)
        values = []
        for key in KNOWLEDGE_COLUMNS:
            value = row.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                value = str(value)
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{at}: {key!r} must be a non-empty string, got {value!r}")
            values.append(value.strip())
        row_dataset, dialogue_id, utterance_id, text = values
        if row_dataset != dataset:
            continue
        row_split = str(row.get("split") or "").strip()
        if row_split and row_split not in SPLITS:
            raise DataError(f"{at}: unknown split {row_split!r}; expected one of {SPLITS}")
        if dataset == "meld" and not row_split:
            raise DataError(f"{at}: MELD dialogue ids repeat across splits, so MELD rows need a 'split'")
        if row_split and split is None:
            raise DataError(f"{at}: the row is for split {row_split!r}; pass split= to say which split "
                            "the dialogues are")
        if row_split and row_split != split:
            continue
        key = (dialogue_id, utterance_id)
        if key in table:
            raise DataError(f"{at}: duplicate knowledge for {dataset} {key} (first at {table[key][1]})")
        table[key] = (normalize_text(text), at)
    return table


def attach_knowledge(dialogues: list[Dialogue], path: str | Path, dataset: str, split: str | None = None, *,
                     allow_missing_utterances: bool = False) -> list[Dialogue]:
    """New dialogues whose utterances carry the sidecar's knowledge (replacing any they had).
    `allow_missing_utterances=True` skips rows for utterances a reader dropped (IEMOCAP turns outside the
    6 classes) instead of raising."""
    table = read_knowledge(path, dataset, split)
    if not table:
        raise DataError(f"{path}: no rows for dataset {dataset!r}" + (f" split {split!r}" if split else ""))
    by_dialogue: dict[str, dict[str, tuple[str, str]]] = {}
    for (dialogue_id, utterance_id), value in table.items():
        by_dialogue.setdefault(dialogue_id, {})[utterance_id] = value
    out, n_matched = [], 0
    for d in dialogues:
        rows = by_dialogue.get(d.dialogue_id)
        if not rows:
            out.append(d)
            continue
        ids = {u.utterance_id for u in d.utterances}
        for utterance_id, (_, at) in rows.items():
            if utterance_id not in ids and not allow_missing_utterances:
                raise DataError(f"{at}: dialogue {d.dialogue_id!r} of {dataset} has no utterance {utterance_id!r}")
        n_matched += len(ids & rows.keys())
        out.append(dataclasses.replace(d, utterances=tuple(
            dataclasses.replace(u, knowledge=rows[u.utterance_id][0]) if u.utterance_id in rows else u
            for u in d.utterances)))
    if n_matched == 0:
        raise DataError(f"{path}: none of its {len(table)} {dataset} rows matches a loaded dialogue id "
                        f"(e.g. {next(iter(table))}); check the ids")
    return out
