"""--retrieval tfidf from the run config to the prompts: example sets, training data, train.py and eval.py."""
import json

import pytest

import eval as eval_script
import train as train_script
from llama_erc.data import IGNORE_INDEX
from llama_erc.engine import eval_run
from llama_erc.data import sets as data_sets
from llama_erc.engine.config import EvalConfig, TrainConfig
from llama_erc.data import DataConfig, load_example_set, training_data
from llama_erc.demo import DEMO_DATA

MELD = f"meld={DEMO_DATA}"
CORPUS = [
    {"dialogue_id": "a", "split": "train", "utterances": [
        {"speaker": "Ann", "text": "The soup is cold again.", "emotion": "mad"},
        {"speaker": "Ben", "text": "I will warm it up.", "emotion": "calm"}]},
    {"dialogue_id": "b", "split": "train", "utterances": [
        {"speaker": "Cy", "text": "We won the final match!", "emotion": "happy"},
        {"speaker": "Di", "text": "Is the soup cold?", "emotion": "calm"}]},
    {"dialogue_id": "c", "split": "dev", "utterances": [
        {"speaker": "Ed", "text": "We won the match", "emotion": "calm"}]},
]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "erc.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in CORPUS))
    return f"jsonl={path}"


def test_example_sets_carry_the_retrieved_train_utterance(corpus):
    [dev] = load_example_set(corpus, "dev", DataConfig(retrieval="tfidf").prompt_config()).examples
    assert "### Similar example:\nCy: We won the final match!\nEmotion: happy" in dev.prompt
    assert dev.response == "calm"   # the dev utterance's own label stays the answer, never the shown one
    train = load_example_set(corpus, "train", DataConfig(retrieval="tfidf").prompt_config()).examples
    # each train utterance retrieves from the other dialogue: "a" from "b" and "b" from "a"
    assert "Di: Is the soup cold?\nEmotion: calm" in train[0].prompt
    assert "Ann: The soup is cold again.\nEmotion: mad" in train[3].prompt
    plain = load_example_set(corpus, "dev", DataConfig().prompt_config()).examples[0]
    assert "Similar example" not in plain.prompt


def test_prompt_response_data_refuses_retrieval(tmp_path):
    spec = f"prompts={tmp_path / 'pr.jsonl'}"
    with pytest.raises(ValueError, match="prompts=.*retrieval tfidf"):
        load_example_set(spec, "train", DataConfig(retrieval="tfidf").prompt_config())


def test_training_data_with_retrieval_keeps_the_responses(corpus, demo_tokenizer):
    from llama_erc.data import load_tokenizer
    tok = load_tokenizer(demo_tokenizer)
    plain, fp_plain = training_data(DataConfig(train_data=(corpus,), max_len=256), tok, seed=0)
    ret, fp_ret = training_data(DataConfig(train_data=(corpus,), max_len=256, retrieval="tfidf"), tok, seed=0)
    assert len(plain) == len(ret) == 4 and fp_plain != fp_ret
    assert all(len(r.ids) > len(p.ids) for p, r in zip(plain, ret))   # same shuffle, longer prompts

    def response(seq):
        return [t for t in seq.labels if t != IGNORE_INDEX]
    assert [response(s) for s in plain] == [response(s) for s in ret]


def test_configs_refuse_an_unknown_retrieval():
    with pytest.raises(ValueError, match="retrieval"):
        TrainConfig(retrieval="bm25")
    with pytest.raises(ValueError, match="retrieval"):
        EvalConfig(data=(MELD,), retrieval="bm25")


def test_train_and_eval_pass_retrieval_to_their_prompts(tmp_path, demo_tokenizer, monkeypatch):
    seen = []

    def spy(module):
        real = module.load_example_set

        def load(spec, split, pcfg, knowledge=(), guard=None):
            seen.append((split, pcfg.retrieval))
            return real(spec, split, pcfg, knowledge, guard)
        monkeypatch.setattr(module, "load_example_set", load)
    spy(data_sets)  # training_data and dev_sets (train.py)
    spy(eval_run)
    out = tmp_path / "run"
    common = ["--dtype", "fp32", "--device", "cpu", "--kernels", "off"]
    assert train_script.main(["--model", "tiny", "--tokenizer", demo_tokenizer, "--train_data", MELD, "--dev_data",
                              MELD, "--retrieval", "tfidf", "--out_dir", str(out), "--micro_batch", "2",
                              "--grad_accum", "1", "--max_steps", "1", "--eval_max_examples", "2", *common]) == 0
    assert json.loads((out / "config.json").read_text())["retrieval"] == "tfidf"
    for extra, want in (([], "tfidf"), (["--retrieval", "none"], "none")):   # the run's, unless overridden
        assert eval_script.main(["--run", str(out), "--data", MELD, "--split", "dev", "--max_examples", "2",
                                 "--out_dir", str(tmp_path / f"eval_{want}"), *extra, *common]) == 0
    assert seen == [("train", "tfidf"), ("dev", "tfidf"), ("dev", "tfidf"), ("dev", "none")]
