import pytest

from llama_erc.data import PAD_FALLBACK_ID, DataError, SentencePieceTokenizer, train_tokenizer

TEXTS = [f"speaker {i % 7}: the {w} was {v} today, number {i}!"
         for i, (w, v) in enumerate([("cake", "great"), ("train", "late"), ("dog", "loud"), ("sky", "grey")] * 60)]


def test_tokenizer_round_trip_and_specials(tiny_tok):
    text = "Wait, what? You sold the bike?! 123 ünï 😀"
    ids = tiny_tok.encode(text, bos=True)
    assert ids[0] == tiny_tok.bos_id == 1 and tiny_tok.eos_id == 2 and tiny_tok.eos_id not in ids
    assert tiny_tok.decode(ids) == text                       # byte fallback: nothing becomes <unk>
    assert 0 not in ids
    assert tiny_tok.encode(text, bos=False, eos=True) == ids[1:] + [2]
    assert tiny_tok.encode("", bos=True, eos=True) == [1, 2]
    assert tiny_tok.pad_id == PAD_FALLBACK_ID == 0            # LLaMA-style: no pad piece
    assert tiny_tok.decode(ids + [tiny_tok.eos_id, tiny_tok.pad_id]) == text   # specials decode to nothing
    assert tiny_tok.vocab_size == 600


def test_train_tokenizer_is_deterministic(tmp_path):
    a = train_tokenizer(TEXTS, 400, tmp_path / "a.model")
    b = train_tokenizer(TEXTS, 400, tmp_path / "b.model")
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()
    assert a.encode(TEXTS[0], bos=True) == b.encode(TEXTS[0], bos=True)


def test_train_tokenizer_small_corpus_and_bad_sizes(tmp_path):
    tok = train_tokenizer(TEXTS[:20], 2000, tmp_path / "small.model")    # corpus too small for 2000
    assert 259 < tok.vocab_size < 2000
    assert tok.decode(tok.encode("a new word: zebra", bos=True)) == "a new word: zebra"
    with pytest.raises(ValueError, match="at least 260"):
        train_tokenizer(TEXTS, 100, tmp_path / "x.model")
    with pytest.raises(ValueError, match="distinct characters"):
        train_tokenizer(TEXTS, 265, tmp_path / "y.model")         # fewer pieces than characters
    with pytest.raises(ValueError, match="no non-empty texts"):
        train_tokenizer(["", "  "], 300, tmp_path / "z.model")


def test_tokenizer_missing_or_invalid_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        SentencePieceTokenizer(tmp_path / "nope.model")
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match="not a valid SentencePiece model"):
        SentencePieceTokenizer(tmp_path / "bad.model")


def test_decode_rejects_out_of_range(tiny_tok):
    with pytest.raises(ValueError, match="out of range"):
        tiny_tok.decode([5, -100])


def test_llama2_golden_ids(llama2_tokenizer_path):
    tok = SentencePieceTokenizer(llama2_tokenizer_path)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (32000, 1, 2, 0)
    assert tok.encode("Hello world! Emotion: sadness", bos=True, eos=True) == \
        [1, 15043, 3186, 29991, 2812, 8194, 29901, 14610, 2264, 2]
    assert tok.encode("Ann: I can't believe it!", bos=False) == [8081, 29901, 306, 508, 29915, 29873, 4658, 372, 29991]
    assert tok.decode([1, 15043, 3186, 2]) == "Hello world"


def test_llama2_sad_is_a_token_prefix_of_sadness(llama2_tokenizer_path):
    """The label-decoding fact: after our prompts' "### Response:" cue, "sad" is [▁sad] and "sadness" is
    [▁sad, ness], so scoring only a label's first token cannot tell them apart. After a newline instead,
    both would start with a bare "s" piece: hence prompts end with the colon."""
    tok = SentencePieceTokenizer(llama2_tokenizer_path)
    prompt = "### Target:\nAnn: I lost my keys.\n\n### Response:"
    n = len(tok.encode(prompt, bos=True))
    sad, sadness = tok.encode(prompt + " sad", bos=True)[n:], tok.encode(prompt + " sadness", bos=True)[n:]
    assert sad == [14610] and sadness == [14610, 2264]
    assert [tok.piece(i) for i in sadness] == ["\u2581sad", "ness"]
    # separate encoding of the response (what collate.py does) gives the same ids as joint encoding
    assert tok.encode("sad", bos=False) == sad and tok.encode("sadness", bos=False) == sadness
    assert tok.encode("Response:\nsadness", bos=False)[2:] == [13, 29879, 328, 2264]   # \n, s, ad, ness
