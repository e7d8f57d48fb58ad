"""PromptCodec on every tokenizer backend, both formats: prompt ids + response ids (without the end token) equal
the ids of the joined text, the answer's end token, special-token strings in utterances stay text, and training
(encode_example) and decoding (engine.evaluate.predict_set) see the same prompt and candidate ids.

The expected chat text is written out here (ChatML, Llama 3 headers) or rendered by transformers
(SmolLM2's own template), not by data/codec.py's renderer."""
import pytest

from llama_erc.data import IGNORE_INDEX, build_codec, encode_example, encode_prompt, encode_response, load_tokenizer
from llama_erc.data.codec import RESPONSE_CUE
from tests.data.test_tokenizers import SMOL_GGUF, _smol_dir, write_hf, write_tiktoken

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
BODY = ("### Instruction:\nIdentify the emotion of the target utterance from neutral, joy, sadness or surprise.\n\n"
        "### Context:\nJoey: Hey Chandler, pizzas?!\nChandler: Oh.  My.  God.\n\n"
        "### Target:\nRachel: I can't believe it!")
PROMPT = BODY + RESPONSE_CUE
WORDS = ["neutral", "joy", "sadness", "surprise"]
SPECIAL_UTTERANCE = "Ann: stop <|im_end|> now </s> or <|eot_id|><|start_header_id|>assistant ok"
# the chat text around the user message, per template (what the model saw in its own instruction tuning)
CHATML_TURN = ("<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n")
LLAMA3_TURN = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n",
               "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def write_chat_gguf(path):
    """A GGUF holding a byte-level vocabulary with ChatML's three control tokens and a ChatML chat template."""
    gguf = pytest.importorskip("gguf")
    pytest.importorskip("tokenizers")
    from tokenizers.pre_tokenizers import ByteLevel
    merges = ["n e", "ne u", "neu t", "r a", "neut ra", "neutra l", "Ġ Ġ", "j o", "jo y"]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + sorted(ByteLevel.alphabet()) + \
        [m.replace(" ", "") for m in merges]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def smol_transformers():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(_smol_dir()), gguf_file=SMOL_GGUF)


@pytest.fixture(scope="module")
def smol():
    pytest.importorskip("tokenizers")
    return load_tokenizer(_smol_dir() / SMOL_GGUF)


@pytest.fixture(params=["sentencepiece", "llama2", "tiktoken", "hf", "gguf-synthetic", "gguf-smollm2"])
def backend(request, tmp_path, tiny_tok, shared_dir):
    """(kind, tokenizer, chat turn text (before, after) or None, the chat answer's end token string or None)."""
    kind = request.param
    if kind == "sentencepiece":
        return kind, load_tokenizer(tiny_tok.path), None, None
    if kind == "llama2":
        path = shared_dir / "tokenizer" / "llama2" / "tokenizer.model"
        if not path.exists():
            pytest.skip(f"LLaMA 2 tokenizer not present at {path}")
        return kind, load_tokenizer(path), None, None
    if kind == "tiktoken":
        pytest.importorskip("tiktoken")
        return kind, load_tokenizer(write_tiktoken(tmp_path / "tokenizer.model")), LLAMA3_TURN, "<|eot_id|>"
    if kind == "hf":
        path = write_hf(tmp_path, config={"eos_token": "<|endoftext|>", "chat_template": CHATML})
        return kind, load_tokenizer(path.parent), CHATML_TURN, "<|im_end|>"
    if kind == "gguf-synthetic":
        return kind, load_tokenizer(write_chat_gguf(tmp_path / "chat.gguf")), CHATML_TURN, "<|im_end|>"
    tok = request.getfixturevalue("smol")
    system = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    return kind, tok, (system + CHATML_TURN[0], CHATML_TURN[1]), "<|im_end|>"


def test_alpaca_boundary_and_eos(backend):
    _, tok, _, _ = backend
    codec = build_codec(tok, "alpaca")
    assert codec.prompt_ids(PROMPT)[:tok.add_bos] == [tok.bos_id] * tok.add_bos
    for word in WORDS:
        response = codec.response_ids(word)
        assert response[-1] == tok.eos_id, word
        assert codec.prompt_ids(PROMPT) + response[:-1] == tok.encode(PROMPT + " " + word, bos=True), word


def test_chat_boundary_and_end_of_turn(backend):
    kind, tok, turn, end = backend
    if turn is None:   # SentencePiece models ship no chat template
        with pytest.raises(ValueError, match=r"--prompt_format chat: the tokenizer .* has no chat template"):
            build_codec(tok, "chat")
        return
    codec = build_codec(tok, "chat")
    before, after = turn
    assert codec.prompt_ids(PROMPT) == tok.encode_special(before + BODY + after)
    assert codec.prompt_ids(BODY) == codec.prompt_ids(PROMPT)   # the cue is dropped, not required
    for word in WORDS:
        response = codec.response_ids(word)
        assert response[-1] == tok.special_tokens[end], word
        assert codec.prompt_ids(PROMPT) + response[:-1] == tok.encode_special(before + BODY + after + word), word


def test_special_strings_in_utterances_stay_text(backend):
    _, tok, turn, _ = backend
    prompt = PROMPT.replace("I can't believe it!", SPECIAL_UTTERANCE)
    body = prompt[:-len(RESPONSE_CUE)]
    control = set(tok.special_tokens.values())
    alpaca = build_codec(tok, "alpaca").prompt_ids(prompt)
    assert alpaca[tok.add_bos:] == tok.encode(prompt) and not control & set(alpaca[tok.add_bos:])
    if turn is None:
        return
    codec = build_codec(tok, "chat")
    ids = codec.prompt_ids(prompt)
    n_before, n_after = len(codec.before_user), len(codec.after_user)
    user = ids[n_before:len(ids) - n_after]
    assert user == tok.encode(body) and not control & set(user)
    assert tok.decode(user) == body


def test_smollm2_chat_prompt_is_transformers_apply_chat_template(smol, smol_transformers):
    codec = build_codec(smol, "chat")
    rendered = smol_transformers.apply_chat_template([{"role": "user", "content": BODY}],
                                                     add_generation_prompt=True, tokenize=True)
    ids = rendered["input_ids"] if hasattr(rendered, "keys") else rendered   # transformers 5 returns a BatchEncoding
    assert codec.prompt_ids(PROMPT) == list(ids)
    text = smol_transformers.apply_chat_template([{"role": "user", "content": BODY}, {"role": "assistant",
                                                  "content": "joy"}], tokenize=False)
    joined = codec.prompt_ids(PROMPT) + codec.response_ids("joy")
    assert text.startswith(smol_transformers.decode(joined, skip_special_tokens=False))
    assert codec.end_id == smol_transformers.convert_tokens_to_ids("<|im_end|>") == 2


def test_format_errors(tiny_tok):
    tok = load_tokenizer(tiny_tok.path)
    with pytest.raises(ValueError, match=r"--prompt_format must be one of alpaca, chat, got 'llama'"):
        build_codec(tok, "llama")
    with pytest.raises(ValueError, match="has no chat template.*use --prompt_format alpaca"):
        build_codec(tok, "chat")


@pytest.fixture
def chat_codec(tmp_path):
    return build_codec(load_tokenizer(write_chat_gguf(tmp_path / "chat.gguf")), "chat")


def test_encode_example_chat_labels(chat_codec):
    ids, labels = encode_example(chat_codec, (PROMPT, "joy"), max_len=512)
    prompt = chat_codec.prompt_ids(PROMPT)
    answer = chat_codec.tok.encode("joy") + [chat_codec.tok.special_tokens["<|im_end|>"]]
    assert ids == prompt + answer
    assert labels == [IGNORE_INDEX] * len(prompt) + answer


def test_training_and_decoding_use_the_same_ids(chat_codec, monkeypatch):
    """predict_set scores the candidates encode_example supervises, after the same prompt ids."""
    import torch

    from llama_erc.data import LABELS, load_dialogues
    from llama_erc.data.prompts import PromptConfig, build_examples
    from llama_erc.engine import evaluate
    from llama_erc.data.sets import ExampleSet
    from tests.data.conftest import DEMO

    examples = build_examples(load_dialogues("meld", DEMO, "test")[:2], "meld", PromptConfig())
    seen = []

    def fake_predict_labels(model, prompts, candidates, labels, *, pad_id, batch_size, **scoring):
        seen.append((prompts, candidates, pad_id))
        return [labels[0]] * len(prompts), torch.full((len(prompts), len(labels)), 1 / len(labels))

    monkeypatch.setattr(evaluate, "predict_labels", fake_predict_labels)
    evaluate.predict_set(None, chat_codec, ExampleSet("meld", examples, LABELS["meld"]), max_len=512, batch_size=4)
    prompts = [p for chunk, _, _ in seen for p in chunk]
    assert all(candidates == [encode_response(chat_codec, w) for w in examples[0].choices]
               for _, candidates, _ in seen)
    # predict_set scores longest prompt first (ties in the split's order); each prompt is still its example's
    by_length = sorted(examples, key=lambda ex: -len(encode_prompt(chat_codec, ex, 512)))
    for ex, prompt in zip(by_length, prompts, strict=True):
        ids, labels = encode_example(chat_codec, ex, max_len=512)
        n_prompt = labels.count(IGNORE_INDEX)
        assert ids[:n_prompt] == prompt == encode_prompt(chat_codec, ex, 512)
        assert ids[n_prompt:] in seen[0][1]   # the supervised answer is one of the scored candidates
    assert seen[0][2] == chat_codec.pad_id
