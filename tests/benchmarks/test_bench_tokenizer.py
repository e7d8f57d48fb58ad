"""bench.py's tokenizer: --tokenizer, else the checkpoint's own, else LLaMA 2's for a preset; alpaca prompts."""
import shutil

import pytest

pytest.importorskip("peft")
pytest.importorskip("transformers")

from llama_erc.benchmarks import bench  # noqa: E402
from llama_erc.data import MELD_LABELS, load_dialogues, train_tokenizer  # noqa: E402
from llama_erc.demo import DEMO_DATA  # noqa: E402


@pytest.fixture(scope="module")
def tok_file(tmp_path_factory):
    texts = [u.text for d in load_dialogues("meld", DEMO_DATA, "train") for u in d.utterances]
    return train_tokenizer(texts + list(MELD_LABELS), 400, tmp_path_factory.mktemp("tok") / "tokenizer.model").path


def test_bench_tokenizer_from_the_checkpoint(tmp_path, tok_file):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shutil.copy(tok_file, ckpt / "tokenizer.model")
    args = bench.parse_args(["--device", "cpu", "--model", str(ckpt)])
    codec = bench.erc_codec(args)
    assert args.tokenizer == str(ckpt) and codec.prompt_format == "alpaca" and codec.vocab_size == 400
    args = bench.parse_args(["--device", "cpu", "--model", str(ckpt), "--tokenizer", str(tok_file)])
    assert bench.erc_codec(args).tok.path == tok_file and args.tokenizer == str(tok_file)


def test_bench_tokenizer_for_a_preset_is_llama2(llama2_tokenizer_path):
    args = bench.parse_args(["--device", "cpu"])
    assert bench.erc_codec(args).vocab_size == 32000 and args.tokenizer == str(llama2_tokenizer_path)
