"""The cross-corpus leak guard (data/leaks.py): what counts as shared, what is dropped, and that a dropped
dialogue reaches no training example, no batch and no retrieval pool."""
import json

import pytest

from llama_erc.data import DataConfig, LeakGuard, PromptConfig, leak_key, load_example_set, training_data

# corpus A's train dialogue "a_leak" holds a line of corpus B's test split (in another case and spacing);
# "a_short" shares only a 3-word line with it, which is not a leak
A = {"train": [("a_leak", [("Ross", "We were on   a break, ross!", "mad"), ("Rachel", "No we were not.", "sad")]),
               ("a_short", [("Joey", "How you doin?", "joy"), ("Chandler", "Could it be any worse?", "sad")]),
               ("a_clean", [("Monica", "I cleaned the whole kitchen today.", "joy")])],
     "dev": [("a_dev", [("Phoebe", "On a break from what exactly?", "mad")])],
     "test": [("a_test", [("Ross", "The dinosaurs are back again.", "joy")])]}
B = {"train": [("b_train", [("Ross", "My sandwich is gone forever now.", "sad"), ("Joey", "I ate it, sorry.", "joy"),
                            ("Ross", "You ate my sandwich?", "mad")])],
     "dev": [("b_dev", [("Gunther", "Coffee is on the house today.", "joy")])],
     "test": [("b_test", [("Rachel", "WE WERE ON A BREAK, Ross!", "mad"),
                          ("Ross", "How you doin?", "joy")])]}


def _write(root, corpus):
    root.mkdir()
    for split, dialogues in corpus.items():
        with open(root / f"{split}.jsonl", "w") as f:
            for did, turns in dialogues:
                f.write(json.dumps({"dialogue_id": did, "utterances": [
                    {"speaker": s, "text": t, "emotion": e} for s, t, e in turns]}) + "\n")
    return f"jsonl={root}"


@pytest.fixture
def specs(tmp_path):
    return _write(tmp_path / "a", A), _write(tmp_path / "b", B)


def test_leak_key_normalises_and_ignores_short_lines():
    assert leak_key("We were on   a break, ross!") == leak_key("We were on a break, Ross!") == "we were on a break, ross!"
    assert leak_key("It\u2019s `so` over now") == leak_key("it's 'so' over now")
    assert leak_key("How you doin?") is None  # 3 words


def test_guard_drops_the_train_dialogue_sharing_another_corpus_test_line(specs):
    a, b = specs
    guard = LeakGuard([a, b])
    report = guard.report
    assert report.pairs == ({"train": a, "held_out": f"{b} test", "utterances": 1, "dialogues": 1},)
    assert report.dropped == {a: ("a_leak",)} and report.n_dropped == 1 and not report.allowed
    assert [d.dialogue_id for d in guard.train_dialogues(a)] == ["a_short", "a_clean"]
    assert "dropped 1 train dialogues" in report.lines()[-1]
    kept = LeakGuard([a, b], allow=True)
    assert kept.report.dropped == {} and len(kept.train_dialogues(a)) == 3 and "KEPT" in kept.report.lines()[-1]
    assert LeakGuard([a]).report.pairs == ()  # a corpus alone: its own splits are not compared
    with pytest.raises(ValueError, match="not built with"):
        LeakGuard([a]).train_dialogues(b)


def test_a_dropped_dialogue_reaches_no_example_sequence_or_pool(specs, tiny_tok):
    a, b = specs
    cfg = DataConfig(train_data=(a, b), max_len=256)
    guard = cfg.leak_guard()
    examples = load_example_set(a, "train", cfg.prompt_config(), guard=guard).examples
    assert {e.dialogue_id for e in examples} == {"a_short", "a_clean"}
    seqs, fingerprints = training_data(cfg, tiny_tok, seed=0)  # the guard is built by default
    assert len(seqs) == 3 + 3 and fingerprints[a]["examples"] == 3  # A without a_leak's 2 utterances, and B's 3
    allowed, _ = training_data(DataConfig(train_data=(a, b), max_len=256, allow_overlap=True), tiny_tok, seed=0)
    assert len(allowed) == 5 + 3
    # retrieval: A's dev line "On a break from what exactly?" is nearest to the leaked dialogue's text, which the
    # guarded pool no longer holds
    pcfg = PromptConfig(retrieval="tfidf")
    [open_pool] = load_example_set(a, "dev", pcfg).examples
    [guarded] = load_example_set(a, "dev", pcfg, guard=guard).examples
    assert "we were on a break, ross!" in open_pool.prompt.lower()
    assert "a break, ross" not in guarded.prompt.lower() and "### Similar example:" in guarded.prompt


def test_trained_overlap_is_what_the_run_kept(specs):
    a, b = specs
    guard = LeakGuard([a, b])
    kept = guard.trained_overlap([a], {}, b, "test")  # a run that dropped nothing (old, or --allow_overlap)
    assert (kept["utterances"], kept["dialogues"]) == (1, 1) and kept["by_train_spec"] == {
        a: {"utterances": 1, "dialogues": 1}}
    clean = guard.trained_overlap([a], {a: ["a_leak"]}, b, "test")  # the run's own guard dropped it
    assert clean["utterances"] == 0 and clean["by_train_spec"] == {}
    assert guard.trained_overlap([a], {}, a, "test")["utterances"] == 0  # its own corpus: not a leak


def test_real_meld_and_emorynlp_overlap(shared_dir):
    meld, emory = shared_dir / "data" / "meld", shared_dir / "data" / "emorynlp" / "meld_repo_csv"
    if not (meld.is_dir() and emory.is_dir()):
        pytest.skip("MELD / EmoryNLP not present in ../shared")
    m, e = f"meld={meld}", f"emorynlp={emory}"
    report = LeakGuard([m, e]).report
    shared = {(p["train"], p["held_out"]): p["utterances"] for p in report.pairs}
    # distinct utterances of >= 4 words (the issue counted 275, 96, and 145 / 240 of any length: our readers repair
    # MELD's mojibake and typographic quotes before comparing, which matches a few more)
    assert shared == {(e, f"{m} test"): 283, (e, f"{m} dev"): 68, (m, f"{e} test"): 103, (m, f"{e} dev"): 127}
    assert {spec: len(ids) for spec, ids in report.dropped.items()} == {m: 57, e: 105}
