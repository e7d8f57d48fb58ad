"""Fixtures shared by the engine tests."""
import pytest

from llama_erc.data import MELD_LABELS, load_dialogues, train_tokenizer
from llama_erc.demo import DEMO_DATA


@pytest.fixture(scope="module")
def demo_tokenizer(tmp_path_factory):
    texts = [u.text for d in load_dialogues("meld", DEMO_DATA, "train") for u in d.utterances]
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    train_tokenizer(texts + list(MELD_LABELS) + ["Identify the emotion of the target utterance"], 400, path)
    return str(path)
