"""bench.py end to end on CPU with the tiny model: every system trains, eval throughput runs, the report is written.
A harness check only: CPU numbers of a tiny model say nothing about GPU throughput."""
import json

import pytest

pytest.importorskip("peft")
pytest.importorskip("transformers")

from llama_erc.benchmarks import bench  # noqa: E402
from llama_erc.data import MELD_LABELS, load_dialogues, train_tokenizer  # noqa: E402
from llama_erc.demo import DEMO_DATA  # noqa: E402

TINY = ["--device", "cpu", "--model", "tiny", "--dtype", "fp32", "--kernels", "off", "--micro-batch", "2",
        "--steps", "2", "--warmup", "1"]
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers 5 deprecations inside PEFT


def _report(out) -> dict:
    (path,) = out.glob("bench-*.json")
    assert path.with_suffix(".md").is_file()
    return json.loads(path.read_text())


def test_bench_erc_and_fixed_modes_write_reports(tmp_path):
    texts = [u.text for d in load_dialogues("meld", DEMO_DATA, "train") for u in d.utterances]
    tok = tmp_path / "tokenizer.model"  # a small vocabulary keeps the tiny model's steps fast
    train_tokenizer(texts + list(MELD_LABELS) + ["Identify the emotion of the target utterance"], 400, tok)

    assert bench.main([*TINY, "--mode", "erc", "--meld", str(DEMO_DATA), "--tokenizer", str(tok), "--packing",
                       "--max-len", "256", "--eval-examples", "4", "--eval-batch", "2",
                       "--systems", "ours,hf_peft_bf16", "--out", str(tmp_path / "erc")]) == 0
    r = _report(tmp_path / "erc")
    assert r["mode"] == "erc" and r["device"] and r["device_type"] == "cpu" and "commit" in r and r["complete"]
    assert set(r["systems"]) == {"ours", "hf_peft_bf16"} and not r["failed"]
    for s in r["systems"].values():
        assert s["tokens_per_s"] > 0 and s["supervised_tokens_per_s"] > 0 and 0 < s["mfu"]
        assert "peak_memory_gb" in s and len(s["step_s_all"]) == 3
    assert r["speedup"] > 0 and "memory_ratio" in r  # memory: None on CPU (no per-system peak there)
    assert r["config"]["packing"] is True and r["config"]["model_config"]["vocab_size"] == 400
    assert r["eval"]["ours_utt_per_s"] > 0 and r["eval"]["hf_utt_per_s"] > 0 and r["eval"]["n_examples"] == 4
    assert r["recipe_minutes"]["ours"] > 0

    assert bench.main([*TINY, "--mode", "fixed", "--seq-len", "16", "--systems", "ours,hf_peft_fp32",
                       "--out", str(tmp_path / "fixed")]) == 0
    r = _report(tmp_path / "fixed")
    assert r["mode"] == "fixed" and set(r["systems"]) == {"ours", "hf_peft_fp32"} and r["eval"] is None
    # the CPU label names what ran, and the config records no machine's directories
    assert (r["model_name"], r["n_params"]) == ("tiny", bench.preset("tiny").n_params)
    md = next((tmp_path / "fixed").glob("bench-*.md")).read_text()
    assert f"(tiny, {r['n_params']:,} parameters, on {r['device']})" in md and "tiny config" not in md
    assert not any(str(r["config"][k]).startswith("/") for k in ("meld", "tokenizer", "out"))
    assert r["ratios"]["ours vs hf_peft_fp32"]["speedup"] > 0 and r["speedup"] is None  # the bf16 baseline did not run
    assert r["batches"]["mean_supervised_per_example"] == 15


def test_bench_variants_run_side_by_side_and_a_failure_is_recorded(tmp_path):
    """--variants runs each configuration as its own system; flex has no CPU backward, so that one fails and is
    recorded while the others still report, and the headline is the fastest that ran."""
    assert bench.main([*TINY, "--mode", "fixed", "--seq-len", "16", "--systems", "ours,hf_peft_bf16",
                       "--variants", "base,packing+fused,packing+flex", "--out", str(tmp_path)]) == 0
    r = _report(tmp_path)
    assert set(r["systems"]) == {"ours[base]", "ours[packing+fused]", "hf_peft_bf16"}
    assert set(r["failed"]) == {"ours[packing+flex]"} and "CPU" in r["failed"]["ours[packing+flex]"]
    assert r["systems"]["ours[packing+fused]"]["variant"] == "packing+fused"
    assert r["headline"] in ("ours[base]", "ours[packing+fused]")
    assert r["speedup"] == r["ratios"][f"{r['headline']} vs hf_peft_bf16"]["speedup"] > 0
    assert r["ratios"][f"{r['headline']} vs hf_peft_bf16"]["overhead_ratio"] is None  # no per-system peak on CPU
    assert r["config"]["variants"] == ["base", "packing+fused", "packing+flex"]
    # the same model, data and dropout seed: the two configurations compute the same losses
    a, b = r["systems"]["ours[base]"], r["systems"]["ours[packing+fused]"]
    assert a["loss_first"] == pytest.approx(b["loss_first"], rel=1e-5)


@pytest.mark.parametrize("spec", ["flex", "prefix", "packing+packing", "packing+turbo", "", "graphs",
                                  "packing+flex+graphs", "packing+compile+graphs"])
def test_bench_rejects_bad_variants(spec):
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cpu", "--variants", f"base,{spec}" if spec else "base,,+"])


def test_bench_selective_variant_needs_checkpointing():
    assert bench.parse_args(["--device", "cpu", "--variants", "packing+selective"]).variants[0].selective
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cpu", "--checkpointing", "off", "--variants", "selective"])


def test_bench_block_variant(capsys):
    assert bench.parse_args(["--device", "cpu", "--variants", "packing+fused+block"]).variants[0].block
    for argv, message in ((["--checkpointing", "off", "--variants", "block"], "need --checkpointing on"),
                          (["--variants", "block+compile"], "not combined with selective or compile"),
                          (["--variants", "block+selective"], "not combined with selective or compile")):
        with pytest.raises(SystemExit):
            bench.parse_args(["--device", "cpu", *argv])
        assert message in capsys.readouterr().err


def test_bench_shared_prefix_counts_examples_tokens_and_computed_ones(tmp_path):
    """ERC prompts share their instruction: the prefix variant computes fewer tokens than the examples hold,
    tokens/s still counts the examples' tokens, and MFU counts only what was computed."""
    texts = [u.text for d in load_dialogues("meld", DEMO_DATA, "train") for u in d.utterances]
    tok = tmp_path / "tokenizer.model"
    train_tokenizer(texts + list(MELD_LABELS) + ["Identify the emotion of the target utterance"], 400, tok)
    assert bench.main([*TINY, "--mode", "erc", "--meld", str(DEMO_DATA), "--tokenizer", str(tok), "--micro-batch", "4",
                       "--eval-examples", "0", "--systems", "ours", "--variants", "packing,packing+prefix",
                       "--out", str(tmp_path / "out")]) == 0
    r = _report(tmp_path / "out")
    plain, shared = r["systems"]["ours[packing]"], r["systems"]["ours[packing+prefix]"]
    assert plain["computed_token_fraction"] == 1.0
    assert 0.3 < shared["computed_token_fraction"] < 0.9
    assert shared["loss_first"] == pytest.approx(plain["loss_first"], rel=1e-4)  # the same examples, the same loss


def test_bench_ours_on_a_quantized_base(tmp_path):
    """--base-quant holds ours' frozen base quantized; the report records it (GPU figures: scripts/gpu_session.sh)."""
    assert bench.main([*TINY, "--mode", "fixed", "--seq-len", "16", "--systems", "ours", "--base-quant", "nf4",
                       "--out", str(tmp_path / "q")]) == 0
    r = _report(tmp_path / "q")
    assert r["config"]["base_quant"] == "nf4" and r["systems"]["ours"]["tokens_per_s"] > 0


def test_bench_graphs_variant_runs_fixed_shapes_eagerly_on_cpu(tmp_path):
    """The graphs variant on a CPU: the fixed-shape batches run eagerly (capture needs CUDA; the GPU numbers
    come from a GPU session), computing the packed variant's losses."""
    texts = [u.text for d in load_dialogues("meld", DEMO_DATA, "train") for u in d.utterances]
    tok = tmp_path / "tokenizer.model"
    train_tokenizer(texts + list(MELD_LABELS) + ["Identify the emotion of the target utterance"], 400, tok)
    assert bench.main([*TINY, "--mode", "erc", "--meld", str(DEMO_DATA), "--tokenizer", str(tok), "--micro-batch", "4",
                       "--eval-examples", "0", "--systems", "ours",
                       "--variants", "packing+prefix,packing+prefix+graphs", "--out", str(tmp_path / "out")]) == 0
    r = _report(tmp_path / "out")
    packed, graphs = r["systems"]["ours[packing+prefix]"], r["systems"]["ours[packing+prefix+graphs]"]
    assert graphs["computed_token_fraction"] == packed["computed_token_fraction"]  # padding is not counted
    assert graphs["loss_first"] == pytest.approx(packed["loss_first"], rel=1e-5)
    assert graphs["loss_last"] == pytest.approx(packed["loss_last"], rel=1e-4)
