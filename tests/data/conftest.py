"""Fixtures for the data tests: the hand-written fixture corpora and a small tokenizer trained once."""
from pathlib import Path

import pytest

from llama_erc.data import load_dialogues, render_prompt, train_tokenizer
from llama_erc.demo import DEMO_DATA
from llama_erc.data.prompts import PromptParts

FIXTURES = Path(__file__).resolve().parent / "fixtures"
DEMO = DEMO_DATA


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def tiny_tok(tmp_path_factory):
    """A 600-piece BPE tokenizer trained on the demo corpus and the prompt template (well under a second)."""
    texts = [u.text for d in load_dialogues("meld", DEMO, "train") for u in d.utterances]
    texts.append(render_prompt(PromptParts("Identify the emotion.", (("A", "hi"),), "B", "ok", "note")))
    return train_tokenizer(texts, 600, tmp_path_factory.mktemp("tok") / "tiny.model")
