import dataclasses

import pytest

from llama_erc.data import (DataError, Dialogue, PromptConfig, Utterance, build_examples, label_words, load_dialogues,
                             mix_examples, render_prompt, with_context)

MELD_INSTRUCTION = ("### Instruction:\nIdentify the emotion of the target utterance in this MELD conversation. "
                    "Answer with exactly one of: neutral, surprise, fear, sadness, joy, disgust, anger.")


@pytest.fixture
def meld_train(fixtures_dir):
    return load_dialogues("meld", fixtures_dir / "meld", "train")


def test_prompt_default_two_context_turns(meld_train):
    examples = build_examples(meld_train, "meld")
    assert len(examples) == 9                                  # one per utterance
    e = examples[6]                                            # dialogue "2", last utterance
    assert (e.dataset, e.dialogue_id, e.utterance_index, e.label, e.response) == ("meld", "2", 3, "sadness", "sadness")
    assert e.prompt == MELD_INSTRUCTION + (
        "\n\n### Context:\nPia: The dog cannot open jars.\nQuin: It was the dog - I swear."
        "\n\n### Target:\nQuin: Fine. I miss that cookie too."
        "\n\n### Response:")
    assert e.choices == ("neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger")
    assert render_prompt(e.parts) == e.prompt


def test_prompt_first_turn_has_no_context_and_knowledge_is_shown(meld_train):
    d = dataclasses.replace(meld_train[0], utterances=(
        dataclasses.replace(meld_train[0].utterances[0], knowledge="Nora is holding a watering can."),))
    [e] = build_examples([d], "meld")
    assert e.prompt == MELD_INSTRUCTION + (
        "\n\n### Target:\nNora: Did anybody water the ferns?"
        "\n\n### Knowledge:\nNora is holding a watering can."
        "\n\n### Response:")
    [e] = build_examples([d], "meld", PromptConfig(use_knowledge=False))
    assert "Knowledge" not in e.prompt


def test_prompt_context_all_and_zero(meld_train):
    all_ctx = build_examples(meld_train, "meld", PromptConfig(context_turns="all"))[6]
    assert all_ctx.parts.context == (("Pia", 'Somebody ate my last "special" cookie!'),
                                     ("Pia", "The dog cannot open jars."), ("Quin", "It was the dog - I swear."))
    none = build_examples(meld_train, "meld", PromptConfig(context_turns=0))[6]
    assert none.parts.context == () and "### Context" not in none.prompt
    assert with_context(all_ctx.parts, 1).context == (("Quin", "It was the dog - I swear."),)
    assert with_context(all_ctx.parts, 0).context == ()
    with pytest.raises(ValueError, match="context_turns"):
        PromptConfig(context_turns="some")
    with pytest.raises(ValueError, match="context_turns"):
        PromptConfig(context_turns=-1)


def test_prompt_iemocap_label_words(fixtures_dir):
    dev = load_dialogues("iemocap", fixtures_dir / "iemocap", "dev")
    examples = build_examples(dev, "iemocap", PromptConfig(context_turns=1))
    assert [(e.label, e.response) for e in examples] == [("neu", "neutral"), ("fru", "frustrated"),
                                                         ("hap", "happy"), ("exc", "excited")]
    assert examples[1].prompt == (
        "### Instruction:\nIdentify the emotion of the target utterance in this IEMOCAP conversation. "
        "Answer with exactly one of: happy, sad, neutral, angry, excited, frustrated."
        "\n\n### Context:\nF: Sorry, is this the line for permits?"
        "\n\n### Target:\nM: It is, and it hasn't moved in an hour."
        "\n\n### Response:")


def test_label_words_configurable_and_validated():
    words = {"Joyful": "joy", "Mad": "mad", "Neutral": "neutral", "Peaceful": "calm", "Powerful": "strong",
             "Sad": "sad", "Scared": "scared"}
    cfg = PromptConfig(label_words={"emorynlp": words})
    d = Dialogue("s01_e01_c01", (Utterance("Ann", "Hi.", "Peaceful"),))
    [e] = build_examples([d], "emorynlp", cfg)
    assert e.response == "calm" and e.label == "Peaceful"
    assert e.prompt.startswith("### Instruction:\nIdentify the emotion of the target utterance in this EmoryNLP "
                               "conversation. Answer with exactly one of: joy, mad, neutral, calm, strong, sad, "
                               "scared.")
    [e] = build_examples([d], "emorynlp")
    assert e.response == "peaceful"                            # default: lower-case label
    with pytest.raises(ValueError, match="must cover exactly"):
        label_words("emorynlp", ("Joyful", "Mad"), cfg)
    with pytest.raises(ValueError, match="distinct"):
        label_words("x", ("a", "b"), PromptConfig(label_words={"x": {"a": "same", "b": "same"}}))


def test_generic_dataset_needs_labels_and_rejects_unknown(fixtures_dir):
    train = load_dialogues("jsonl", fixtures_dir / "erc.jsonl", "train")
    with pytest.raises(ValueError, match="pass labels="):
        build_examples(train, "mycorpus")
    examples = build_examples(train, "mycorpus", labels=("calm", "happy", "sad"))
    assert "in this mycorpus conversation. Answer with exactly one of: calm, happy, sad." in examples[0].prompt
    assert examples[1].parts.knowledge == "Bo squints at a dark cake."
    with pytest.raises(DataError, match="label 'sad' not in"):
        build_examples(train, "mycorpus", labels=("calm", "happy"))


def test_few_shot_prompt(meld_train, fixtures_dir):
    dev = load_dialogues("meld", fixtures_dir / "meld", "dev")
    cfg = PromptConfig(n_shots=2, seed=3, context_turns=0)
    examples = build_examples(dev, "meld", cfg, demo_pool=meld_train)
    again = build_examples(dev, "meld", cfg, demo_pool=meld_train)
    assert examples == again                                   # fixed seed
    demos = examples[0].parts.demonstrations
    assert len(demos) == 2 and all(x == demos for x in (e.parts.demonstrations for e in examples))
    assert examples[0].prompt == MELD_INSTRUCTION + "\n\n### Examples:\n" + "\n\n".join(demos) + (
        "\n\n### Target:\nRafa: Is the printer fixed yet?\n\n### Response:")
    pool = {f"{u.speaker}: {u.text}\nEmotion: {u.emotion}" for d in meld_train for u in d.utterances}
    assert set(demos) <= pool
    other = build_examples(dev, "meld", dataclasses.replace(cfg, seed=4), demo_pool=meld_train)
    assert other[0].parts.demonstrations != demos
    with pytest.raises(ValueError, match="needs demo_pool"):
        build_examples(dev, "meld", cfg)
    with pytest.raises(ValueError, match="pool has only 9"):
        build_examples(dev, "meld", PromptConfig(n_shots=10), demo_pool=meld_train)


def test_mix_examples_joint_training(meld_train, fixtures_dir):
    meld = build_examples(meld_train, "meld")
    emory = build_examples(load_dialogues("emorynlp", fixtures_dir / "emorynlp_csv", "train"), "emorynlp")
    mixed = mix_examples([meld, emory], seed=0)
    assert sorted(map(id, mixed)) == sorted(map(id, meld + emory))
    assert mixed == mix_examples([meld, emory], seed=0) and mixed != meld + emory
    assert mixed != mix_examples([meld, emory], seed=1)
    for e in mixed:                                            # each keeps its own label set
        assert ("MELD" in e.prompt) == (e.dataset == "meld") and e.response in e.choices
