"""Emotion-impact auxiliary prompts (build_impact_examples): history and next speaker, never the target's text."""
import dataclasses

import pytest

from llama_erc.data import (PromptConfig, build_examples, build_impact_examples, encode_example, encode_prompt,
                             load_dialogues, render_prompt, with_context)

IMPACT_INSTRUCTION = ("### Instruction:\nPredict the emotion of the next speaker's utterance in this MELD "
                      "conversation. Answer with exactly one of: neutral, surprise, fear, sadness, joy, disgust, "
                      "anger.")


@pytest.fixture
def meld_train(fixtures_dir):
    return load_dialogues("meld", fixtures_dir / "meld", "train")


def test_impact_prompt_holds_history_and_next_speaker_not_target(meld_train):
    examples = build_impact_examples(meld_train, "meld")
    assert len(examples) == sum(len(d.utterances) - 1 for d in meld_train)  # every utterance but the first
    e = next(x for x in examples if (x.dialogue_id, x.utterance_index) == ("2", 3))
    assert e.prompt == IMPACT_INSTRUCTION + (
        "\n\n### Context:\nPia: The dog cannot open jars.\nQuin: It was the dog - I swear."
        "\n\n### Next speaker:\nQuin"
        "\n\n### Response:")
    assert (e.response, e.label) == ("sadness", "sadness")
    assert render_prompt(e.parts) == e.prompt
    erc = {(x.dialogue_id, x.utterance_index): x for x in build_examples(meld_train, "meld")}
    for x in examples:
        target = next(d for d in meld_train if d.dialogue_id == x.dialogue_id).utterances[x.utterance_index]
        assert x.utterance_index > 0
        assert target.text not in x.prompt and "### Target:" not in x.prompt
        assert x.prompt.endswith(f"### Next speaker:\n{target.speaker}\n\n### Response:")
        same = erc[(x.dialogue_id, x.utterance_index)]
        assert x.parts.context == same.parts.context and x.response == same.response
        assert x.choices == same.choices


def test_impact_prompt_follows_context_turns_and_hides_knowledge(meld_train):
    d = meld_train[1]
    d = dataclasses.replace(d, utterances=d.utterances[:-1] + (
        dataclasses.replace(d.utterances[-1], knowledge="Quin looks at the empty jar."),))
    [*_, last] = build_impact_examples([d], "meld", PromptConfig(context_turns="all"))
    assert [s for s, _ in last.parts.context] == ["Pia", "Pia", "Quin"]
    assert "Knowledge" not in last.prompt and "empty jar" not in last.prompt
    assert len(build_impact_examples([d], "meld", PromptConfig(context_turns=1))[0].parts.context) == 1
    assert build_impact_examples([d], "meld", PromptConfig(context_turns=0)) == []


def test_impact_prompt_truncation_drops_oldest_context_first(tiny_tok, meld_train):
    [*_, e] = build_impact_examples(meld_train[1:2], "meld", PromptConfig(context_turns="all"))  # 3 context turns
    sizes = [len(tiny_tok.encode(render_prompt(with_context(e.parts, k)), bos=True)) for k in range(4)]
    assert sizes == sorted(sizes) and len(set(sizes)) == 4
    n_response = max(len(tiny_tok.encode(w, bos=False, eos=True)) for w in e.choices)
    ids, labels = encode_example(tiny_tok, e, max_len=sizes[2] + n_response)  # room for the 2 newest turns
    assert ids[:sizes[2]] == tiny_tok.encode(render_prompt(with_context(e.parts, 2)), bos=True)
    kept = tiny_tok.decode(ids[:sizes[2]])
    assert "Somebody ate" not in kept and "It was the dog" in kept and "Next speaker:\nQuin" in kept
    assert encode_prompt(tiny_tok, e, max_len=sizes[0] + n_response, n_reserved=n_response) == \
        tiny_tok.encode(render_prompt(with_context(e.parts, 0)), bos=True)
