from collections import Counter

import pytest

from llama_erc.data import (EMORYNLP_LABELS, IEMOCAP_LABELS, MELD_LABELS, DataError, Dialogue, Utterance,
                             dialogue_labels, load_dialogues, normalize_text)


def n_utterances(dialogues: list[Dialogue]) -> int:
    return sum(len(d.utterances) for d in dialogues)


# ---- MELD ----------------------------------------------------------------------------------------------

def test_meld_fixture_groups_sorts_and_normalises(fixtures_dir):
    train = load_dialogues("meld", fixtures_dir / "meld", "train")
    assert [d.dialogue_id for d in train] == ["0", "2", "3"]                  # Dialogue_ID 1 does not exist
    assert [u.utterance_id for u in train[1].utterances] == ["0", "1", "3", "4"]   # sorted, with a gap
    assert [u.emotion for u in train[1].utterances] == ["anger", "disgust", "fear", "sadness"]
    assert train[0].utterances[1] == Utterance("Omar", "I did, twice. They're drowning now.", "joy", "1")
    assert train[0].utterances[2].text == "Twice? You're hopeless..."        # double space, ’ and …
    assert train[1].utterances[0].text == 'Somebody ate my last "special" cookie!'
    assert train[1].utterances[2].text == "It was the dog - I swear."
    counts = {s: n_utterances(load_dialogues("meld", fixtures_dir / "meld", s)) for s in ("train", "dev", "test")}
    assert counts == {"train": 9, "dev": 3, "test": 4}


@pytest.mark.parametrize("split, n_dialogues, n_utts", [("train", 1038, 9989), ("dev", 114, 1109),
                                                        ("test", 280, 2610)])
def test_meld_real_counts(shared_dir, split, n_dialogues, n_utts):
    root = shared_dir / "data" / "meld"
    if not root.is_dir():
        pytest.skip(f"MELD not present at {root}")
    dialogues = load_dialogues("meld", root, split)
    assert (len(dialogues), n_utterances(dialogues)) == (n_dialogues, n_utts)
    assert {u.emotion for d in dialogues for u in d.utterances} == set(MELD_LABELS)
    if split == "train":
        assert "60" not in {d.dialogue_id for d in dialogues}
        counts = Counter(u.emotion for d in dialogues for u in d.utterances)
        assert (counts["neutral"], counts["disgust"]) == (4710, 271)
        quirks = ("\u2019", "\u2018", "\u201c", "\u2026", "\u2014", "  ")   # normalised away
        assert not any(q in u.text for d in dialogues for u in d.utterances for q in quirks)


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path.parent


MELD_HEADER = "Sr No.,Utterance,Speaker,Emotion,Sentiment,Dialogue_ID,Utterance_ID,Season,Episode,StartTime,EndTime\n"


@pytest.mark.parametrize("row, message", [
    ('1,Hi.,Ann,happiness,positive,0,0,1,1,"0","1"\n', r"train_sent_emo.csv:3: unknown emotion label 'happiness'"),
    ('1,Hi.,Ann,joy,positive,zero,0,1,1,"0","1"\n', r"train_sent_emo.csv:3: column Dialogue_ID must be an integer"),
    ('1,Hi.,Ann,joy,positive,0,0,1\n', r"train_sent_emo.csv:3: 8 fields, header has 11"),
    ('1,  ,Ann,joy,positive,0,0,1,1,"0","1"\n', r"train_sent_emo.csv:3: empty utterance text"),
    ('1,Hi.,Ann,joy,positive,9,5,1,1,"0","1"\n', r"train_sent_emo.csv:3: duplicate .* first seen on line 2"),
])
def test_meld_bad_rows_name_file_and_line(tmp_path, row, message):
    good = '0,Ok.,Ben,neutral,neutral,9,5,1,1,"00:00:00,000","00:00:01,000"\n'
    root = _write(tmp_path / "train_sent_emo.csv", MELD_HEADER + good + row)
    with pytest.raises(DataError, match=message):
        load_dialogues("meld", root, "train")


def test_meld_missing_file_column_and_kind(tmp_path):
    with pytest.raises(DataError, match=r"dev_sent_emo.csv: file not found"):
        load_dialogues("meld", tmp_path, "dev")
    root = _write(tmp_path / "test_sent_emo.csv", "Sr No.,Utterance,Speaker\n1,Hi,Ann\n")
    with pytest.raises(DataError, match=r"test_sent_emo.csv:1: missing column\(s\) \['Emotion'"):
        load_dialogues("meld", root, "test")
    with pytest.raises(DataError, match="unknown split"):
        load_dialogues("meld", root, "validation")
    with pytest.raises(DataError, match="unknown dataset kind"):
        load_dialogues("friends", root, "test")
    with pytest.raises(DataError, match="not a directory"):
        load_dialogues("meld", root / "test_sent_emo.csv", "test")


def test_meld_cp1252_file_is_read(tmp_path):
    row = '1,It\u2019s fine.,Ann,neutral,neutral,0,0,1,1,"00:00:01,000","00:00:02,000"\n'   # ’ is byte 0x92
    (tmp_path / "dev_sent_emo.csv").write_bytes((MELD_HEADER + row).encode("cp1252"))
    [d] = load_dialogues("meld", tmp_path, "dev")
    assert d.utterances[0].text == "It's fine."


def test_normalize_text_repairs_encodings():
    assert normalize_text("It\u00e2\u20ac\u2122s \u201cfine\u201d\u2026") == 'It\'s "fine"...'   # UTF-8 read as cp1252
    assert normalize_text("It\x92s  ok\u00a0 \t") == "It's ok"                         # C1 control from cp1252
    assert normalize_text("Caf\u00e9 \u2013 nai\u0308ve") == "Caf\u00e9 - na\u00efve"   # NFC, en dash
    assert normalize_text("Ah\u00c3 ok") == "Ah\u00c3 ok"                               # not mojibake: kept


# ---- EmoryNLP ------------------------------------------------------------------------------------------

def test_emorynlp_csv_fixture(fixtures_dir):
    train = load_dialogues("emorynlp", fixtures_dir / "emorynlp_csv", "train")
    assert [d.dialogue_id for d in train] == ["s01_e01_c01", "s01_e01_c02", "s02_e10_c04"]
    scene2 = train[1].utterances
    assert [u.utterance_id for u in scene2] == ["s01_e01_c02_u002", "s01_e01_c02_u003"]   # sorted by id
    assert [u.emotion for u in scene2] == ["Scared", "Joyful"]
    assert scene2[1].speaker == "Milo Reyes and Nia Cole"
    assert train[0].utterances[0] == Utterance("Lena Park", "Okay, who moved my chair?", "Mad",
                                               "s01_e01_c01_u001")
    root = fixtures_dir / "emorynlp_csv"
    counts = [n_utterances(load_dialogues("emorynlp", root, s)) for s in ("train", "dev", "test")]
    assert counts == [7, 3, 2]


def test_emorynlp_json_fixture_matches_csv(fixtures_dir):
    csv_dev = load_dialogues("emorynlp", fixtures_dir / "emorynlp_csv", "dev")
    json_dev = load_dialogues("emorynlp", fixtures_dir / "emorynlp_json", "dev")
    assert json_dev == csv_dev                             # same ids, speakers, text and labels
    test = load_dialogues("emorynlp", fixtures_dir / "emorynlp_json", "test")
    assert [(d.dialogue_id, len(d.utterances)) for d in test] == [("s03_e04_c07", 2), ("s03_e04_c08", 1),
                                                                  ("s03_e05_c01", 2)]
    assert test[1].utterances[0].speaker == "Unknown"      # empty speakers list
    assert n_utterances(load_dialogues("emorynlp", fixtures_dir / "emorynlp_json", "train")) == 2


@pytest.mark.parametrize("split, n_scenes, n_utts", [("train", 659, 7551), ("dev", 89, 954), ("test", 79, 984)])
def test_emorynlp_real_csv_counts(shared_dir, split, n_scenes, n_utts):
    root = shared_dir / "data" / "emorynlp" / "meld_repo_csv"
    if not root.is_dir():
        pytest.skip(f"EmoryNLP CSV not present at {root}")
    dialogues = load_dialogues("emorynlp", root, split)
    assert (len(dialogues), n_utterances(dialogues)) == (n_scenes, n_utts)
    assert {u.emotion for d in dialogues for u in d.utterances} == set(EMORYNLP_LABELS)


@pytest.mark.parametrize("split, n_scenes, n_utts, n_neutral", [("dev", 99, 1344, 393), ("test", 85, 1328, 349)])
def test_emorynlp_real_json_counts(shared_dir, split, n_scenes, n_utts, n_neutral):
    root = shared_dir / "data" / "emorynlp" / "json"
    if not root.is_dir():
        pytest.skip(f"EmoryNLP JSON not present at {root}")
    dialogues = load_dialogues("emorynlp", root, split)
    assert (len(dialogues), n_utterances(dialogues)) == (n_scenes, n_utts)
    assert Counter(u.emotion for d in dialogues for u in d.utterances)["Neutral"] == n_neutral
    if split == "dev":   # the CSV dev split is a subset of the JSON one, with the same ids, text and labels
        csv_dev = load_dialogues("emorynlp", shared_dir / "data" / "emorynlp" / "meld_repo_csv", "dev")
        by_id = {u.utterance_id: u for d in dialogues for u in d.utterances}
        assert all(by_id[u.utterance_id] == u for d in csv_dev for u in d.utterances)


def test_emorynlp_errors(tmp_path, fixtures_dir):
    with pytest.raises(DataError, match="no EmoryNLP dev file; expected emorynlp_dev_final.csv"):
        load_dialogues("emorynlp", tmp_path, "dev")
    header = "Utterance,Speaker,Emotion,Scene_ID,Utterance_ID,Season,Episode,Start_Time,End_Time\n"
    _write(tmp_path / "emorynlp_test_final.csv", header + "Hi.,Monica,Neutral,1,1,1,1,0,1\n")
    with pytest.raises(DataError, match=r"emorynlp_test_final.csv:2: Speaker must be a list string"):
        load_dialogues("emorynlp", tmp_path, "test")
    _write(tmp_path / "emorynlp_test_final.csv", header + "Hi.,['M'],Angry,1,1,1,1,0,1\n")
    with pytest.raises(DataError, match=r"emorynlp_test_final.csv:2: unknown emotion label 'Angry'"):
        load_dialogues("emorynlp", tmp_path, "test")
    doc = (fixtures_dir / "emorynlp_json" / "emotion-detection-dev.json").read_text()
    _write(tmp_path / "j" / "emotion-detection-dev.json", doc.replace('"transcript"', '"text"', 1))
    with pytest.raises(DataError, match=r"episodes\[0\].scenes\[0\].utterances\[0\]: missing key 'transcript'"):
        load_dialogues("emorynlp", tmp_path / "j", "dev")
    _write(tmp_path / "j" / "emotion-detection-dev.json", doc[:-20])
    with pytest.raises(DataError, match=r"emotion-detection-dev.json:\d+: invalid JSON"):
        load_dialogues("emorynlp", tmp_path / "j", "dev")


# ---- IEMOCAP -------------------------------------------------------------------------------------------

def test_iemocap_fixture_splits_and_labels(fixtures_dir):
    root = fixtures_dir / "iemocap"
    train, dev, test = (load_dialogues("iemocap", root, s) for s in ("train", "dev", "test"))
    # Sessions 1-4 hold 5 dialogues with 6-class turns (Ses04M_impro06 has none); sorted, position 0 is dev
    assert [d.dialogue_id for d in dev] == ["Ses01F_impro01"]
    assert [d.dialogue_id for d in train] == ["Ses01M_script01_1", "Ses02F_impro02", "Ses03M_impro03",
                                              "Ses04F_script02_1"]
    assert [d.dialogue_id for d in test] == ["Ses05F_impro01", "Ses05M_script01_1b"]
    assert [n_utterances(x) for x in (train, dev, test)] == [8, 4, 4]
    # start-time order, xxx turn dropped, gender letter as speaker
    assert [(u.speaker, u.emotion, u.utterance_id[-4:]) for u in dev[0].utterances] == \
        [("F", "neu", "F000"), ("M", "fru", "M000"), ("F", "hap", "F001"), ("F", "exc", "F002")]
    assert dev[0].utterances[1].text == "It is, and it hasn't moved in an hour."
    assert {u.emotion for d in train + dev + test for u in d.utterances} == set(IEMOCAP_LABELS)


def test_iemocap_turns_sorted_by_start_time_ties_in_file_order(tmp_path):
    # written for this test: the transcript lists turns out of time order, and F001/M001 start together
    base = tmp_path / "iemocap" / "Session5" / "dialog"
    _write(base / "transcriptions" / "Ses05F_impro09.txt",
           "Ses05F_impro09_M000 [010.0000-011.0000]: Third.\n"
           "Ses05F_impro09_F000 [002.5000-004.0000]: First.\n"
           "Ses05F_impro09_F001 [005.0000-006.0000]: Second, said first.\n"
           "Ses05F_impro09_M001 [005.0000-007.0000]: Second, said next.\n"
           "Ses05F_impro09_F002 [9.5-9.9]: Between.\n")
    _write(base / "EmoEvaluation" / "Ses05F_impro09.txt", "".join(
        f"[0.0 - 1.0]\tSes05F_impro09_{t}\t{e}\t[2.5000, 2.5000, 2.5000]\n\n"
        for t, e in [("F000", "neu"), ("F001", "hap"), ("F002", "sad"), ("M000", "ang"), ("M001", "fru")]))
    (dialogue,) = load_dialogues("iemocap", tmp_path / "iemocap", "test")
    assert [u.utterance_id[-4:] for u in dialogue.utterances] == ["F000", "F001", "M001", "F002", "M000"]
    assert [u.text for u in dialogue.utterances][:3] == ["First.", "Second, said first.", "Second, said next."]


def test_iemocap_errors(tmp_path, fixtures_dir):
    import shutil
    root = tmp_path / "iemocap"
    shutil.copytree(fixtures_dir / "iemocap", root)
    evaluation = root / "Session5" / "dialog" / "EmoEvaluation" / "Ses05F_impro01.txt"
    good = evaluation.read_text()
    evaluation.write_text(good.replace("\tneu\t", "\tbored\t"))
    with pytest.raises(DataError, match=r"Ses05F_impro01.txt:3: unknown IEMOCAP label 'bored'"):
        load_dialogues("iemocap", root, "test")
    evaluation.write_text(good.replace("_F000\t", "_F099\t"))
    with pytest.raises(DataError, match=r"labelled turn\(s\) \['Ses05F_impro01_F099'\] not in"):
        load_dialogues("iemocap", root, "test")
    evaluation.unlink()
    with pytest.raises(DataError, match=r"EmoEvaluation/Ses05F_impro01.txt: file not found"):
        load_dialogues("iemocap", root, "test")
    transcript = root / "Session1" / "dialog" / "transcriptions" / "Ses01F_impro01.txt"
    good = transcript.read_text()
    transcript.write_text(good.replace("_F001 [", "_F001 (", 1))
    with pytest.raises(DataError, match=r"Ses01F_impro01.txt:3: malformed turn"):
        load_dialogues("iemocap", root, "dev")
    transcript.write_text(good)
    shutil.rmtree(root / "Session3")
    with pytest.raises(DataError, match=r"Session3/dialog/transcriptions: no transcription files"):
        load_dialogues("iemocap", root, "train")


# ---- generic JSONL -------------------------------------------------------------------------------------

def test_jsonl_file_mode(fixtures_dir):
    path = fixtures_dir / "erc.jsonl"
    train = load_dialogues("jsonl", path, "train")
    assert [d.dialogue_id for d in train] == ["t1", "t2"]
    assert train[0].utterances[1] == Utterance("Bo", "It looks burnt.", "calm", "1", "Bo squints at a dark cake.")
    assert train[1].utterances[0].utterance_id == "u7"
    assert dialogue_labels(train) == ("calm", "happy", "sad")
    [dev] = load_dialogues("jsonl", path, "dev")
    assert dev.dialogue_id == "3" and [u.emotion for u in dev.utterances] == ["calm", "happy"]
    assert n_utterances(load_dialogues("jsonl", path, "test")) == 1
    with pytest.raises(DataError, match=r"erc.jsonl:5: .*unknown emotion label 'sad'"):
        load_dialogues("jsonl", path, "test", labels=("calm", "happy"))


def test_jsonl_directory_mode(fixtures_dir):
    root = fixtures_dir / "jsonl_dir"
    counts = [n_utterances(load_dialogues("jsonl", root, s)) for s in ("train", "dev", "test")]
    assert counts == [3, 1, 2]


_UTT = '{"speaker": "A", "text": "t", "emotion": "joy"}'


@pytest.mark.parametrize("line, message", [
    ('{"dialogue_id": "a", "split": "train", "utterances": []}', r"x.jsonl:2: dialogue 'a' needs a non-empty"),
    ('{"dialogue_id": "a", "utterances": [%s]}' % _UTT, r"x.jsonl:2: 'split' must be"),
    ('{"dialogue_id": "a", "split": "train", "utterances": [{"speaker": "A", "emotion": "joy"}]}',
     r"x.jsonl:2: utterances\[0\]: 'text' must be"),
    ('{"dialogue_id": "a", "split": "train", "utterances": [%s]' % _UTT, r"x.jsonl:2: invalid JSON"),
    ('["not", "an", "object"]', r"x.jsonl:2: expected a JSON object"),
    ('{"dialogue_id": "z", "split": "training", "utterances": []}', r"x.jsonl:2: unknown split 'training'"),
    ('{"dialogue_id": "z", "split": "test", "utterances": [{"speaker": "A", "text": "t", "emotion": "fear"}]}',
     r"x.jsonl:2: utterances\[0\]: unknown emotion label 'fear'; expected one of \('joy',\)"),
])
def test_jsonl_bad_lines(tmp_path, line, message):
    first = '{"dialogue_id": "z", "split": "train", "utterances": [{"speaker": "A", "text": "t", "emotion": "joy"}]}'
    path = _write(tmp_path / "x.jsonl", first + "\n" + line + "\n") / "x.jsonl"
    with pytest.raises(DataError, match=message):
        for split in ("train", "test"):
            load_dialogues("jsonl", path, split)


def test_jsonl_split_mismatch_and_labels_only_for_jsonl(fixtures_dir, tmp_path):
    root = _write(tmp_path / "dev.jsonl", '{"dialogue_id": "a", "split": "test", "utterances": '
                                          '[{"speaker": "A", "text": "t", "emotion": "joy"}]}\n')
    with pytest.raises(DataError, match="says split 'test' but the file is dev.jsonl"):
        load_dialogues("jsonl", root, "dev", labels=("joy",))
    with pytest.raises(DataError, match="train.jsonl: file not found"):
        load_dialogues("jsonl", root, "dev")      # label set comes from train, which is missing
    with pytest.raises(DataError, match="labels= applies to corpora without a fixed label set; meld has one"):
        load_dialogues("meld", fixtures_dir / "meld", "dev", labels=("joy",))
