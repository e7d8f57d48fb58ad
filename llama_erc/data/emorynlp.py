"""EmoryNLP readers: the standard ERC CSV split and the official JSON release -> list[Dialogue].

1. CSV (`emorynlp_{train,dev,test}_final.csv`, the split ERC papers use): columns Utterance, Speaker, Emotion,
   Scene_ID, Utterance_ID, Season, Episode, ...; Speaker is a Python-list string (`['Monica Geller']`);
   a dialogue is one scene, keyed by (Season, Episode, Scene_ID).
2. JSON (`emotion-detection-{trn,dev,tst}.json`): {season_id, episodes: [{episode_id, scenes: [{scene_id,
   utterances: [{utterance_id, speakers, transcript, emotion, ...}]}]}]}.
Both give the same ids: dialogue `s01_e02_c03`, utterance `s01_e02_c03_u004` (the JSON's own ids, rebuilt from
the CSV's numbers), so a knowledge sidecar works with either. The directory decides the format: the CSV for
the split if it is there, else the JSON. Several speakers on one turn are joined with " and ".
"""
from __future__ import annotations

import ast
from pathlib import Path

from llama_erc.data.files import parse_int, read_csv_rows, read_json
from llama_erc.data.schema import DataError, Dialogue, Utterance, check_split, make_utterance, where

EMORYNLP_LABELS = ("Joyful", "Mad", "Neutral", "Peaceful", "Powerful", "Sad", "Scared")
EMORYNLP_CSV = {"train": "emorynlp_train_final.csv", "dev": "emorynlp_dev_final.csv",
                "test": "emorynlp_test_final.csv"}
EMORYNLP_JSON = {"train": "emotion-detection-trn.json", "dev": "emotion-detection-dev.json",
                 "test": "emotion-detection-tst.json"}
_REQUIRED = ("Utterance", "Speaker", "Emotion", "Scene_ID", "Utterance_ID", "Season", "Episode")


def _speaker(speakers: object, at: str) -> str:
    if not isinstance(speakers, list) or not all(isinstance(s, str) for s in speakers):
        raise DataError(f"{at}: speakers must be a list of strings, got {speakers!r}")
    # An empty list occurs in the full official release for off-screen voices: name it, do not fail.
    return " and ".join(s.strip() for s in speakers if s.strip()) or "Unknown"


def read_emorynlp_csv(path: str | Path) -> list[Dialogue]:
    """Scenes of one CSV, sorted by (Season, Episode, Scene_ID), utterances by Utterance_ID."""
    path = Path(path)
    scenes: dict[tuple[int, int, int], dict[int, Utterance]] = {}
    for line, row in read_csv_rows(path, _REQUIRED):
        at = where(path, line)
        key = tuple(parse_int(row[c], c, at) for c in ("Season", "Episode", "Scene_ID"))
        utt = parse_int(row["Utterance_ID"], "Utterance_ID", at)
        try:
            speakers = ast.literal_eval(row["Speaker"].strip())
        except (ValueError, SyntaxError):
            raise DataError(f"{at}: Speaker must be a list string like ['Name'], got {row['Speaker']!r}") from None
        scene = scenes.setdefault(key, {})
        if utt in scene:
            raise DataError(f"{at}: duplicate Utterance_ID {utt} in scene {key}")
        dialogue_id = "s%02d_e%02d_c%02d" % key
        scene[utt] = make_utterance(_speaker(speakers, at), row["Utterance"], row["Emotion"], EMORYNLP_LABELS,
                                    at, utterance_id=f"{dialogue_id}_u{utt:03d}")
    return [Dialogue("s%02d_e%02d_c%02d" % key, tuple(utts[u] for u in sorted(utts)))
            for key, utts in sorted(scenes.items())]


def _get(obj: object, key: str, kind: type, at: str):
    if not isinstance(obj, dict) or key not in obj:
        raise DataError(f"{at}: missing key {key!r}")
    if not isinstance(obj[key], kind):
        raise DataError(f"{at}.{key}: expected {kind.__name__}, got {type(obj[key]).__name__}")
    return obj[key]


def read_emorynlp_json(path: str | Path) -> list[Dialogue]:
    """Scenes of one official JSON file in file order. Errors name the JSON path, e.g.
    `file: episodes[2].scenes[0].utterances[5]`."""
    path = Path(path)
    doc = read_json(path)
    dialogues = []
    for i, episode in enumerate(_get(doc, "episodes", list, f"{path}: <root>")):
        for j, scene in enumerate(_get(episode, "scenes", list, f"{path}: episodes[{i}]")):
            at_scene = f"{path}: episodes[{i}].scenes[{j}]"
            scene_id = _get(scene, "scene_id", str, at_scene)
            utterances = []
            for k, u in enumerate(_get(scene, "utterances", list, at_scene)):
                at = f"{at_scene}.utterances[{k}]"
                utterances.append(make_utterance(
                    _speaker(_get(u, "speakers", list, at), at), _get(u, "transcript", str, at),
                    _get(u, "emotion", str, at), EMORYNLP_LABELS, at,
                    utterance_id=_get(u, "utterance_id", str, at)))
            if not utterances:
                raise DataError(f"{at_scene}: scene {scene_id!r} has no utterances")
            dialogues.append(Dialogue(scene_id, tuple(utterances)))
    return dialogues


def read_emorynlp(root: str | Path, split: str) -> list[Dialogue]:
    """`root` holds the CSV split or the official JSON files; the CSV wins when both are there."""
    check_split(split)
    root = Path(root)
    if (root / EMORYNLP_CSV[split]).is_file():
        return read_emorynlp_csv(root / EMORYNLP_CSV[split])
    if (root / EMORYNLP_JSON[split]).is_file():
        return read_emorynlp_json(root / EMORYNLP_JSON[split])
    raise DataError(f"{root}: no EmoryNLP {split} file; expected {EMORYNLP_CSV[split]} (CSV split) "
                    f"or {EMORYNLP_JSON[split]} (official JSON)")
