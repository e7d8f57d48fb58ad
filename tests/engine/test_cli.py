"""train.py and eval.py end to end on the bundled demo data (tiny random model), and their argument errors."""
import json

import pytest

import eval as eval_script
import train as train_script
from llama_erc.data import MELD_LABELS
from llama_erc.demo import DEMO_DATA

MELD = f"meld={DEMO_DATA}"


def test_train_then_eval(tmp_path, demo_tokenizer, capsys):
    out = tmp_path / "run"
    argv = ["--model", "tiny", "--tokenizer", demo_tokenizer, "--train_data", MELD, "--dev_data", MELD,
            "--out_dir", str(out), "--dtype", "fp32", "--device", "cpu", "--kernels", "off", "--micro_batch", "4",
            "--grad_accum", "2", "--max_steps", "3", "--eval_max_examples", "8", "--save_every", "2"]
    assert train_script.main(argv) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "eta_s", "peak_memory_gb"} <= set(steps[0])
    assert (out / "best" / "adapters.safetensors").exists() and (out / "checkpoints" / "step_0000003").exists()

    ev = tmp_path / "eval"
    assert eval_script.main(["--run", str(out), "--data", MELD, "--split", "test", "--out_dir", str(ev),
                             "--dtype", "fp32", "--device", "cpu", "--kernels", "off", "--max_examples", "10"]) == 0
    report = json.loads((ev / "report.json").read_text())
    assert report["n"] == 10 and set(report["labels"]) == set(MELD_LABELS)
    rows = (ev / "predictions.csv").read_text().splitlines()
    assert len(rows) == 11 and rows[0].startswith("dialogue_id,utterance_index,gold,pred,p_neutral")
    assert all(r.split(",")[3] in MELD_LABELS for r in rows[1:])  # always a valid label
    assert (ev / "confusion.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("extra, match", [
    (["--train_data", "meld=/nonexistent"], "/nonexistent"),
    (["--train_data", MELD, "--max_len", "20"], "does not fit in max_len=20"),
    (["--train_data", MELD, "--model", "llama-9b"], "neither a checkpoint (a directory or a .gguf file) nor a preset"),
    (["--train_data", MELD, "--tokenizer", "/nope/tokenizer.model"], "/nope/tokenizer.model"),
    ([], "no training data"),
])
def test_train_bad_input_fails_fast(tmp_path, demo_tokenizer, capsys, extra, match):
    argv = ["--tokenizer", demo_tokenizer, "--out_dir", str(tmp_path / "r"), "--device", "cpu", "--dtype", "fp32",
            *extra]
    assert train_script.main(argv) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_eval_requires_data():
    assert eval_script.main(["--run", "x"]) == 2


def test_train_on_prompt_response_jsonl(tmp_path, demo_tokenizer):
    """A generic {"prompt", "response"} JSONL is a training set by itself."""
    from pathlib import Path
    fixture = Path(__file__).resolve().parents[1] / "data" / "fixtures" / "prompt_response.jsonl"
    out = tmp_path / "run"
    argv = ["--model", "tiny", "--tokenizer", demo_tokenizer, "--train_data", f"prompts={fixture}",
            "--out_dir", str(out), "--dtype", "fp32", "--device", "cpu", "--kernels", "off", "--micro_batch", "2",
            "--grad_accum", "1", "--max_steps", "2"]
    assert train_script.main(argv) == 0
    assert (out / "checkpoints" / "step_0000002" / "adapters.safetensors").exists()


def test_eval_few_shot_base_model(tmp_path, demo_tokenizer):
    """No --run: the base model alone, zero- or few-shot (demonstrations drawn from train)."""
    ev = tmp_path / "eval"
    assert eval_script.main(["--model", "tiny", "--tokenizer", demo_tokenizer, "--data", MELD, "--split", "dev",
                             "--n_shots", "2", "--out_dir", str(ev), "--dtype", "fp32", "--device", "cpu",
                             "--kernels", "off", "--max_examples", "4"]) == 0
    assert json.loads((ev / "report.json").read_text())["n"] == 4


def test_few_shot_prompts_carry_train_demonstrations():
    from llama_erc.data import DataConfig, load_example_set
    zero = load_example_set(MELD, "dev", DataConfig().prompt_config())
    few = load_example_set(MELD, "dev", DataConfig().prompt_config(n_shots=3, shot_seed=1))
    assert "### Examples:" in few.examples[0].prompt and "### Examples:" not in zero.examples[0].prompt
    assert len(few.examples[0].parts.demonstrations) == 3
