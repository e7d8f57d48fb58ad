import pytest

from llama_erc.data import (IGNORE_INDEX, LABELS, DataError, PromptConfig, SentencePieceTokenizer, build_examples,
                             encode_example, encode_prompt, encode_response, label_words, load_dialogues,
                             load_prompt_response_jsonl, render_prompt, with_context)


@pytest.fixture
def examples(fixtures_dir):
    return build_examples(load_dialogues("meld", fixtures_dir / "meld", "train"), "meld",
                          PromptConfig(context_turns="all"))


def test_encode_example_layout(tiny_tok, examples):
    e = examples[6]
    ids, labels = encode_example(tiny_tok, e, max_len=4096)
    prompt_ids = tiny_tok.encode(e.prompt, bos=True)
    response_ids = tiny_tok.encode("sadness", bos=False, eos=True)
    assert ids == prompt_ids + response_ids and ids[0] == tiny_tok.bos_id and ids[-1] == tiny_tok.eos_id
    assert labels == [IGNORE_INDEX] * len(prompt_ids) + response_ids     # response + EOS supervised
    assert encode_example(tiny_tok, (e.prompt, e.response), 4096) == (ids, labels)   # pair form
    assert encode_example(tiny_tok, (e.parts, e.response), 4096) == (ids, labels)


def test_truncation_drops_oldest_context_first(tiny_tok, examples):
    e = examples[6]                                          # 3 context turns
    n_response = len(tiny_tok.encode(e.response, bos=False, eos=True))
    sizes = [len(tiny_tok.encode(render_prompt(with_context(e.parts, k)), bos=True)) for k in range(4)]
    assert sizes == sorted(sizes) and len(set(sizes)) == 4
    for keep in range(4):
        max_len = sizes[keep] + n_response                   # room for exactly `keep` turns
        ids, labels = encode_example(tiny_tok, e, max_len)
        assert len(ids) == len(labels) == max_len
        text = tiny_tok.decode(ids)
        assert text == render_prompt(with_context(e.parts, keep)) + " sadness"
        assert text.startswith("### Instruction:") and "Quin: Fine. I miss that cookie too." in text
        if keep < 3:
            assert "Somebody ate my last" not in text       # the oldest turn goes first
        if keep == 1:
            assert "It was the dog - I swear." in text and "The dog cannot open jars." not in text
    with pytest.raises(ValueError, match=r"meld dialogue '2' utterance 3: does not fit in max_len=.*"
                                         r"without context or demonstrations is \d+ tokens"):
        encode_example(tiny_tok, e, sizes[0] + n_response - 1)


def test_truncation_then_drops_demonstrations(tiny_tok, fixtures_dir):
    train = load_dialogues("meld", fixtures_dir / "meld", "train")
    [e] = build_examples(load_dialogues("meld", fixtures_dir / "meld", "dev"), "meld",
                         PromptConfig(n_shots=3, seed=0), demo_pool=train)[2:]
    # the budget reserves the longest label word + EOS, whatever this example's own label is
    n_response = max(len(tiny_tok.encode(w, bos=False, eos=True)) for w in e.choices)
    one_demo = len(tiny_tok.encode(render_prompt(with_context(e.parts, 0, 1)), bos=True)) + n_response
    ids, _ = encode_example(tiny_tok, e, one_demo)
    assert tiny_tok.decode(ids) == render_prompt(with_context(e.parts, 0, 1)) + " " + e.response


def test_training_and_decoding_truncate_prompts_alike(tiny_tok, examples):
    """encode_example keeps the same prompt tokens that decoding (encode_prompt reserving the longest label) sees."""
    reserve = max(len(encode_response(tiny_tok, w)) for w in examples[6].choices)
    for max_len in range(20, 160):  # every budget, so some fall between two context-turn boundaries
        for e in examples:
            try:
                ids, labels = encode_example(tiny_tok, e, max_len)
            except ValueError:
                continue
            n_prompt = sum(1 for y in labels if y == -100)
            assert ids[:n_prompt] == encode_prompt(tiny_tok, e, max_len, n_reserved=reserve)


def test_encode_prompt_reserves_room_for_labels(tiny_tok, examples):
    e = examples[6]
    full = encode_prompt(tiny_tok, e, 4096)
    assert full == tiny_tok.encode(e.prompt, bos=True)
    short = encode_prompt(tiny_tok, e, len(full), n_reserved=4)     # 4 tokens kept free for a label + EOS
    assert len(short) <= len(full) - 4 and short[-3:] == full[-3:]


def test_plain_prompt_cannot_be_truncated(tiny_tok, fixtures_dir):
    pairs = load_prompt_response_jsonl(fixtures_dir / "prompt_response.jsonl")
    assert [(p.response, p.dialogue_id) for p in pairs] == [("positive", "prompt_response.jsonl:1"),
                                                            ("negative", "prompt_response.jsonl:2")]
    ids, labels = encode_example(tiny_tok, pairs[0], 4096)
    assert labels[-2:] == ids[-2:] and labels[-1] == tiny_tok.eos_id
    with pytest.raises(ValueError, match=r"prompt_response dialogue 'prompt_response.jsonl:1'.*no parts to truncate"):
        encode_example(tiny_tok, pairs[0], 10)


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "Q", "response": ""}', r"p.jsonl:2: 'response' must be a non-empty string"),
    ('{"response": "yes"}', r"p.jsonl:2: 'prompt' must be a non-empty string"),
    ('{"prompt": "Q", "response": "yes"', r"p.jsonl:2: invalid JSON"),
])
def test_prompt_response_jsonl_errors(tmp_path, line, message):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "Q", "response": "yes"}\n' + line + "\n")
    with pytest.raises(DataError, match=message):
        load_prompt_response_jsonl(path)
    with pytest.raises(DataError, match="file not found"):
        load_prompt_response_jsonl(tmp_path / "missing.jsonl")


def test_llama2_prompt_and_response_encode_like_joint_text(llama2_tokenizer_path, examples):
    """What makes separate response encoding safe: for every default label word of every dataset,
    ids(prompt) + ids(word) == ids(prompt + " " + word) with the real LLaMA 2 tokenizer."""
    tok = SentencePieceTokenizer(llama2_tokenizer_path)
    prompt = examples[6].prompt
    n = len(tok.encode(prompt, bos=True))
    for dataset, labels in LABELS.items():
        for word in label_words(dataset, labels, PromptConfig()).values():
            assert tok.encode(prompt + " " + word, bos=True)[n:] == tok.encode(word, bos=False), (dataset, word)
    ids, labels = encode_example(tok, examples[6], 512)
    assert ids[-3:] == [14610, 2264, 2] and labels[-4:] == [IGNORE_INDEX, 14610, 2264, 2]
