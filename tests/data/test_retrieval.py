"""Retrieved demonstrations: TF-IDF nearest train utterance of another dialogue, shown with its train label."""
import dataclasses
from pathlib import Path

import pytest

from llama_erc.data import (Dialogue, PromptConfig, Utterance, build_examples, encode_prompt, load_dialogues,
                             nearest_train_utterances, render_prompt, with_context)
from llama_erc.data.encode import as_codec

MELD_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "meld"


def dialogue(dialogue_id, *turns):
    """turns: (speaker, text, emotion)."""
    return Dialogue(dialogue_id, tuple(Utterance(s, t, e) for s, t, e in turns))


@pytest.fixture
def pool():
    return [
        dialogue("t0", ("Ann", "The cake is burnt again.", "anger"), ("Ben", "Order a pizza then.", "neutral")),
        dialogue("t1", ("Cal", "My cat ran away last night.", "sadness"),
                 ("Dee", "The cake smells wonderful!", "joy")),
        dialogue("t2", ("Eve", "Is the cake burnt?", "fear"), ("Fin", "The cake is burnt again.", "disgust")),
    ]


def texts(rows):
    return [[u.text for u in row] for row in rows]


def test_nearest_is_the_most_similar_text_of_another_dialogue(pool):
    [row] = nearest_train_utterances([dialogue("dev0", ("X", "my cat ran away", "neutral"))], pool)
    assert texts([row]) == [["My cat ran away last night."]]
    got = nearest_train_utterances(pool, pool)
    # t0's "The cake is burnt again." has an exact copy in t2; its own copy (itself) is never a candidate
    assert got[0][0] is pool[2].utterances[1]
    assert got[2][1] is pool[0].utterances[0]
    assert got[2][0] is pool[0].utterances[0]   # "Is the cake burnt?" -> the burnt cake of t0 (t2 excluded)
    for d, row in zip(pool, got):
        assert not any(r is u for r in row for u in d.utterances)   # never a turn of its own dialogue


def test_dev_queries_retrieve_from_any_train_dialogue(pool):
    dev = [dialogue("d0", ("X", "Order a pizza", "joy")), dialogue("d1", ("Y", "cat ran away", "joy")),
           dialogue("d2", ("Z", "Is the cake burnt", "joy"))]
    got = nearest_train_utterances(dev, pool)
    assert [row[0] for row in got] == [pool[0].utterances[1], pool[1].utterances[0], pool[2].utterances[0]]
    # a dev dialogue that only shares a train dialogue's id (MELD restarts ids per split) is another dialogue
    [row] = nearest_train_utterances([dialogue("t1", ("Y", "cat ran away", "joy"))], pool)
    assert row[0] is pool[1].utterances[0]
    # the same dialogue (id, speakers, texts) is excluded whatever its labels say
    relabelled = dialogue("t1", ("Cal", "My cat ran away last night.", "joy"), ("Dee", "The cake smells wonderful!",
                                                                              "joy"))
    [row] = nearest_train_utterances([relabelled], pool)
    assert row[0] is not pool[1].utterances[0] and all(r not in pool[1].utterances for r in row)


def test_ties_and_zero_similarity_pick_the_lowest_pool_index(pool):
    # "the cake is burnt again" exists twice (t0 #0, t2 #1): a dev query equal to both gets the first
    [row] = nearest_train_utterances([dialogue("d", ("X", "The cake is burnt again.", "joy"))], pool)
    assert row[0] is pool[0].utterances[0]
    # no shared term: every score is 0, so the first candidate in pool order (t0's first turn; t1's for t0)
    [row] = nearest_train_utterances([dialogue("d", ("X", "zzz qqq", "joy"))], pool)
    assert row[0] is pool[0].utterances[0]
    got = nearest_train_utterances([dialogue("t0", ("Ann", "zzz", "joy"), ("Ben", "qqq", "joy"))], pool)
    assert got[0][0] is pool[0].utterances[0]   # same id, other turns: not t0, so t0's first turn is a candidate


def test_chunking_does_not_change_the_answer(pool):
    assert nearest_train_utterances(pool, pool, chunk_rows=1) == nearest_train_utterances(pool, pool)


def test_gold_labels_of_the_queries_are_never_read(pool):
    relabelled = [Dialogue(d.dialogue_id, tuple(dataclasses.replace(u, emotion="neutral") for u in d.utterances))
                  for d in pool]
    assert nearest_train_utterances(relabelled, pool) == nearest_train_utterances(pool, pool)
    cfg = PromptConfig(retrieval="tfidf")
    a = build_examples(pool, "meld", cfg, retrieval_pool=pool)
    b = build_examples(relabelled, "meld", cfg, retrieval_pool=pool)
    assert [e.parts.demonstrations for e in a] == [e.parts.demonstrations for e in b]
    assert [e.response for e in b] == ["neutral"] * 6


def test_prompt_shows_the_retrieved_utterance_with_its_train_label(pool):
    dev = [dialogue("d0", ("Ann", "Hello.", "neutral"), ("Ben", "My cat ran away!", "surprise"))]
    plain = build_examples(dev, "meld", PromptConfig(context_turns=1))
    ret = build_examples(dev, "meld", PromptConfig(context_turns=1, retrieval="tfidf"), retrieval_pool=pool)
    e = ret[1]
    assert "### Similar example:\nCal: My cat ran away last night.\nEmotion: sadness\n\n### Context:" in e.prompt
    assert "### Examples:" not in e.prompt
    assert e.parts.n_retrieved == 1 and render_prompt(e.parts) == e.prompt
    for p, r in zip(plain, ret):   # the target side is untouched
        assert (p.response, p.label, p.choices, p.utterance_index) == (r.response, r.label, r.choices,
                                                                        r.utterance_index)
        assert render_prompt(with_context(r.parts, len(r.parts.context), 0)) == p.prompt


def test_few_shot_examples_come_first_and_the_retrieved_one_is_dropped_first(pool):
    dev = [dialogue("d0", ("Ben", "My cat ran away!", "surprise"))]
    [e] = build_examples(dev, "meld", PromptConfig(n_shots=2, retrieval="tfidf"), demo_pool=pool,
                         retrieval_pool=pool)
    assert len(e.parts.demonstrations) == 3 and e.parts.n_retrieved == 1
    assert e.prompt.index("### Examples:") < e.prompt.index("### Similar example:") < e.prompt.index("### Target:")
    assert e.prompt.count("Emotion:") == 3
    fewer = with_context(e.parts, 0, 2)
    assert fewer.n_retrieved == 0 and "### Similar example:" not in render_prompt(fewer)
    assert render_prompt(fewer) == build_examples(dev, "meld", PromptConfig(n_shots=2), demo_pool=pool)[0].prompt


def test_truncation_drops_context_then_the_retrieved_demonstration(pool, tiny_tok):
    dev = [dialogue("d0", ("Ann", "Hello there, how was the long day at work?", "neutral"),
                    ("Ben", "My cat ran away!", "surprise"))]
    [_, e] = build_examples(dev, "meld", PromptConfig(context_turns=1, retrieval="tfidf"), retrieval_pool=pool)
    codec = as_codec(tiny_tok)
    full = codec.prompt_ids(e.prompt)
    no_context = codec.prompt_ids(render_prompt(with_context(e.parts, 0)))
    bare = codec.prompt_ids(render_prompt(with_context(e.parts, 0, 0)))
    assert len(full) > len(no_context) > len(bare)
    assert encode_prompt(tiny_tok, e, len(full)) == full
    assert encode_prompt(tiny_tok, e, len(full) - 1) == no_context       # context goes first
    assert encode_prompt(tiny_tok, e, len(no_context) - 1) == bare       # then the demonstration
    with pytest.raises(ValueError, match="does not fit"):
        encode_prompt(tiny_tok, e, len(bare) - 1)


def test_bad_settings_are_refused(pool):
    with pytest.raises(ValueError, match="retrieval must be"):
        PromptConfig(retrieval="bm25")
    with pytest.raises(ValueError, match="needs retrieval_pool="):
        build_examples(pool, "meld", PromptConfig(retrieval="tfidf"))
    with pytest.raises(ValueError, match="no candidate"):
        nearest_train_utterances(pool[:1], pool[:1])
    with pytest.raises(ValueError, match="no TF-IDF vocabulary"):
        nearest_train_utterances(pool, [dialogue("t9", ("A", "!", "joy"))])


@pytest.mark.skipif(not (MELD_DIR / "train_sent_emo.csv").is_file(), reason="no shared copy of MELD")
def test_meld_dev_and_train_retrieval_is_fast_and_leak_free():
    train = load_dialogues("meld", MELD_DIR, "train")
    dev = load_dialogues("meld", MELD_DIR, "dev")
    owner = {id(u): d.dialogue_id for d in train for u in d.utterances}
    # no wall-clock assert (shared CPUs make it flaky): both calls take under 1 s of CPU time
    got = nearest_train_utterances(dev, train)
    on_train = nearest_train_utterances(train[:200], train)
    assert all(id(r) in owner for row in got for r in row)   # always a train utterance
    assert all(owner[id(r)] != d.dialogue_id for d, row in zip(train[:200], on_train) for r in row)
    assert sum(len(row) for row in got) == sum(len(d.utterances) for d in dev)
