from collections import Counter

from llama_erc.data import MELD_LABELS, load_dialogues
from llama_erc.demo import DEMO_DATA
from llama_erc.demo.make_data import write_demo


def test_demo_is_regenerated_byte_for_byte(tmp_path):
    counts = write_demo(tmp_path, seed=0)
    for split in ("train", "dev", "test"):
        name = f"{split}_sent_emo.csv"
        assert (tmp_path / name).read_bytes() == (DEMO_DATA / name).read_bytes(), name
    assert counts == {"train": 473, "dev": 113, "test": 107}


def test_demo_reads_as_meld_with_all_labels():
    header = (DEMO_DATA / "dev_sent_emo.csv").read_bytes().split(b"\r\n")[0]   # CRLF, as MELD
    assert header == (b"Sr No.,Utterance,Speaker,Emotion,Sentiment,Dialogue_ID,Utterance_ID,Season,Episode,"
                      b"StartTime,EndTime")
    for split, n_utts in (("train", 473), ("dev", 113), ("test", 107)):
        dialogues = load_dialogues("meld", DEMO_DATA, split)
        counts = Counter(u.emotion for d in dialogues for u in d.utterances)
        assert sum(counts.values()) == n_utts and set(counts) == set(MELD_LABELS)
        assert counts.most_common(1)[0][0] == "neutral"
        assert all(3 <= len(d.utterances) <= 8 for d in dialogues)


def test_demo_is_learnable_from_wording():
    """A bag-of-words classifier beats the majority class by a wide margin: the wording carries the label."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score

    def xy(split):
        utts = [u for d in load_dialogues("meld", DEMO_DATA, split) for u in d.utterances]
        return [u.text for u in utts], [u.emotion for u in utts]

    (x_train, y_train), (x_test, y_test) = xy("train"), xy("test")
    vec = TfidfVectorizer()
    clf = LogisticRegression(max_iter=1000).fit(vec.fit_transform(x_train), y_train)
    f1 = f1_score(y_test, clf.predict(vec.transform(x_test)), average="weighted")
    majority = f1_score(y_test, ["neutral"] * len(y_test), average="weighted")
    assert f1 > majority + 0.3, (f1, majority)
