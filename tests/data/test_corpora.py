"""The dataset registry: kinds, label sets, display names and label words come from its rows, and a new corpus is
one reader plus one row."""
import json

import pytest

from llama_erc.data import (CORPORA, DATA_KINDS, ERC_KINDS, LABELS, PROMPTS_KIND, Corpus, DataError, Dialogue,
                             PromptConfig, build_examples, load_dialogues, load_example_set)
from llama_erc.data import corpora
from llama_erc.data.schema import make_utterance


def test_kinds_and_labels_are_derived_from_the_rows():
    assert ERC_KINDS == tuple(CORPORA) == ("meld", "emorynlp", "iemocap", "jsonl")
    assert DATA_KINDS == (*ERC_KINDS, PROMPTS_KIND)
    assert LABELS == {k: c.labels for k, c in CORPORA.items() if c.labels is not None} and "jsonl" not in LABELS
    assert corpora.display_name("emorynlp") == "EmoryNLP" and corpora.display_name("my_set") == "my_set"
    assert corpora.default_label_words("iemocap", ("hap", "fru")) == {"hap": "happy", "fru": "frustrated"}
    assert corpora.default_label_words("emorynlp", ("Joyful",)) == {"Joyful": "joyful"}
    with pytest.raises(DataError, match="unknown dataset kind 'friends'; expected one of meld, emorynlp"):
        load_dialogues("friends", "x", "train")


def test_a_new_corpus_is_one_reader_and_one_row(tmp_path, monkeypatch):
    """A corpus the project does not know, added as a registry row with its reader: dialogues, prompts naming it,
    its own label words and the example set eval.py scores, with nothing else touched."""
    (tmp_path / "dev.json").write_text(json.dumps([["Mia", "I won the race!", "up"], ["Leo", "Well done.", "flat"]]))

    def read_toy(path, split):  # the reader: one JSON list of turns per split file, one dialogue
        turns = json.loads((path / f"{split}.json").read_text())
        labels = ("up", "flat", "down")
        return [Dialogue("d0", tuple(make_utterance(s, t, e, labels, f"{split}.json") for s, t, e in turns))]

    row = Corpus("toy", "Toy Corpus", read_toy, ("up", "flat", "down"), {"up": "happy", "down": "sad"})
    monkeypatch.setitem(CORPORA, "toy", row)
    eset = load_example_set(f"toy={tmp_path}", "dev", PromptConfig())
    assert eset.labels == ("up", "flat", "down") and [e.label for e in eset.examples] == ["up", "flat"]
    first = eset.examples[0]
    assert "this Toy Corpus conversation" in first.prompt and "happy, flat, sad" in first.prompt
    assert first.response == "happy" and first.choices == ("happy", "flat", "sad")
    assert build_examples(load_dialogues("toy", tmp_path, "dev"), "toy")[1].response == "flat"
