import pytest

from llama_erc.data import DataError, attach_knowledge, load_dialogues


def test_attach_knowledge_csv_by_split(fixtures_dir):
    train = load_dialogues("meld", fixtures_dir / "meld", "train")
    out = attach_knowledge(train, fixtures_dir / "knowledge.csv", "meld", "train")
    got = {(d.dialogue_id, u.utterance_id): u.knowledge for d in out for u in d.utterances if u.knowledge}
    assert got == {("0", "1"): "Omar grins and holds up an empty watering can.",
                   ("2", "3"): "Quin points at a dog, avoiding eye contact."}
    assert all(u.knowledge is None for d in train for u in d.utterances)     # inputs untouched (frozen)
    [dev] = attach_knowledge(load_dialogues("meld", fixtures_dir / "meld", "dev"),
                             fixtures_dir / "knowledge.csv", "meld", "dev")
    assert [u.knowledge for u in dev.utterances] == [None, "Sol holds a crumpled page.", None]
    emory = attach_knowledge(load_dialogues("emorynlp", fixtures_dir / "emorynlp_csv", "train"),
                             fixtures_dir / "knowledge.csv", "emorynlp")
    assert emory[0].utterances[1].knowledge == "Milo shrugs."


def test_attach_knowledge_jsonl_and_dropped_turns(fixtures_dir):
    dev = load_dialogues("iemocap", fixtures_dir / "iemocap", "dev")
    path = fixtures_dir / "knowledge.jsonl"
    with pytest.raises(DataError, match=r"knowledge.jsonl:2: dialogue 'Ses01F_impro01' of iemocap has no "
                                        r"utterance 'Ses01F_impro01_M001'"):
        attach_knowledge(dev, path, "iemocap")            # M001 is an xxx turn the reader dropped
    [d] = attach_knowledge(dev, path, "iemocap", allow_missing_utterances=True)
    assert d.utterances[2].knowledge == "She smiles with relief."


_HEADER = "dataset,split,dialogue_id,utterance_id,knowledge\n"


@pytest.mark.parametrize("text,error", [
    (_HEADER + "meld,train,0,1,\n", r"k.csv:2: 'knowledge' must be a non-empty string"),
    ("dataset,dialogue_id,utterance_id,knowledge\nmeld,0,1,text\n", r"k.csv:2: MELD dialogue ids repeat across splits"),
    (_HEADER + "meld,train,0,1,a\nmeld,train,0,1,b\n", r"k.csv:3: duplicate knowledge .* \(first at .*k.csv:2\)"),
    (_HEADER + "meld,train,dia0,utt1,a\n", r"none of its 1 meld rows matches a loaded dialogue id"),
    ("dataset,dialogue_id,knowledge\nmeld,0,a\n", r"k.csv:1: missing column\(s\) \['utterance_id'\]"),
])
def test_attach_knowledge_rejects_bad_file(fixtures_dir, tmp_path, text, error):
    train = load_dialogues("meld", fixtures_dir / "meld", "train")
    bad = tmp_path / "k.csv"
    bad.write_text(text)
    with pytest.raises(DataError, match=error):
        attach_knowledge(train, bad, "meld", "train")


def test_attach_knowledge_errors(fixtures_dir, tmp_path):
    train = load_dialogues("meld", fixtures_dir / "meld", "train")
    with pytest.raises(DataError, match="pass split="):
        attach_knowledge(train, fixtures_dir / "knowledge.csv", "meld")
    with pytest.raises(DataError, match="no rows for dataset 'iemocap'"):
        attach_knowledge(train, fixtures_dir / "knowledge.csv", "iemocap")
    with pytest.raises(DataError, match=r"must be .csv or .jsonl"):
        attach_knowledge(train, tmp_path / "k.txt", "meld", "train")
