"""train.py / eval.py with --base_quant: a run on a GGUF file's own blocks logs the same fp32 losses, step by step,
as the run that dequantizes it at load; it records its base, writes the llama.cpp adapter for that file, and
eval.py reloads the same quantized base, refusing another file or another base_quant."""
import json
import shutil

import pytest

pytest.importorskip("gguf")
pytest.importorskip("transformers")

import eval as eval_script  # noqa: E402
import train as train_script  # noqa: E402
from llama_erc.demo import DEMO_DATA  # noqa: E402
from llama_erc.model.llamacpp_lora import read_llamacpp_lora  # noqa: E402
from tests.model.helpers_gguf import write_gguf  # noqa: E402
from tests.model.helpers_hf import TinySpec, make_hf_model  # noqa: E402

MELD = f"meld={DEMO_DATA}"
TYPES = {"token_embd.weight": "Q8_0", "output.weight": "Q4_1", **{
    f"blk.{i}.{n}.weight": t for i in range(2) for n, t in (
        ("attn_q", "Q4_0"), ("attn_k", "Q4_1"), ("attn_v", "Q8_0"), ("attn_output", "Q8_0"),
        ("ffn_gate", "Q4_1"), ("ffn_up", "Q8_0"), ("ffn_down", "Q4_0"))}}


@pytest.fixture(scope="module")
def gguf_base(tmp_path_factory):
    spec = TinySpec("base", hidden=64, heads=4, kv_heads=2, intermediate=96, vocab=400)  # the demo tokenizer's
    d = tmp_path_factory.mktemp("base")
    return write_gguf(make_hf_model(spec), d / "base.gguf", types=TYPES), write_gguf(
        make_hf_model(spec, seed=1), d / "other.gguf", types=TYPES)


def _train(out, base, tokenizer, base_quant, *extra):
    argv = ["--model", str(base), "--tokenizer", tokenizer, "--train_data", MELD, "--dev_data", MELD,
            "--out_dir", str(out), "--dtype", "fp32", "--device", "cpu", "--kernels", "off", "--micro_batch", "4",
            "--grad_accum", "1", "--max_steps", "4", "--eval_max_examples", "8", "--eval_every", "2",
            "--lora_targets", "wq,wk,wv,wo,w1,w2,w3", "--base_quant", base_quant, "--log_every", "1", *extra]
    assert train_script.main(argv) == 0
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.parametrize("extra", [[], ["--fused_lora", "--activation_checkpointing", "full", "--packing"]],
                         ids=["eager", "fused_ckpt_packed"])
def test_gguf_base_trains_like_the_dequantized_file(gguf_base, demo_tokenizer, tmp_path, extra):
    base, _ = gguf_base
    dense = _train(tmp_path / "none", base, demo_tokenizer, "none", *extra)
    quant = _train(tmp_path / "gguf", base, demo_tokenizer, "gguf", *extra)
    assert len(quant) == 4 and quant == dense
    assert not (tmp_path / "none" / "llamacpp-adapter.gguf").exists()
    tensors, alpha = read_llamacpp_lora(tmp_path / "gguf" / "llamacpp-adapter.gguf")
    assert alpha == 16.0 and len(tensors) == 2 * 7 * 2
    record = json.loads((tmp_path / "gguf" / "best" / "config.json").read_text())
    assert record["base"]["quant"] == "gguf" and record["base"]["files"] == {"base.gguf": base.stat().st_size}


def test_eval_reloads_the_quantized_base_and_refuses_another(gguf_base, demo_tokenizer, tmp_path, capsys):
    base, other = gguf_base
    run = tmp_path / "run"
    _train(run, base, demo_tokenizer, "gguf")
    common = ["--run", str(run), "--data", MELD, "--split", "test", "--dtype", "fp32", "--device", "cpu",
              "--max_examples", "6"]
    assert eval_script.main([*common, "--out_dir", str(tmp_path / "ev")]) == 0
    assert eval_script.main([*common, "--out_dir", str(tmp_path / "ev2"), "--model", str(other)]) == 2
    assert "is another file" in capsys.readouterr().err
    assert eval_script.main([*common, "--out_dir", str(tmp_path / "ev3"), "--base_quant", "none"]) == 2
    assert "trained on a gguf base" in capsys.readouterr().err
    copy = tmp_path / "copy.gguf"  # the same bytes under another name: the same base
    shutil.copy(base, copy)
    assert eval_script.main([*common, "--out_dir", str(tmp_path / "ev4"), "--model", str(copy)]) == 0


def test_base_quant_refusals(demo_tokenizer, tmp_path, capsys):
    argv = ["--model", "tiny", "--tokenizer", demo_tokenizer, "--train_data", MELD, "--out_dir", str(tmp_path / "r"),
            "--device", "cpu", "--dtype", "fp32", "--max_steps", "1"]
    assert train_script.main([*argv, "--base_quant", "gguf"]) == 2
    assert "is a preset" in capsys.readouterr().err
    assert train_script.main([*argv, "--base_quant", "int4"]) == 2
    assert "base_quant" in capsys.readouterr().err
