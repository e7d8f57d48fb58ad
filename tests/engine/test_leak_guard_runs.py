"""The leak guard through train.py and eval.py: the run prints and records what it dropped, and eval.py checks the
run's training data against the split it scores (refusing a leak unless --allow_overlap, which the report states)."""
import json

from llama_erc.engine.eval_run import main as eval_main
from llama_erc.engine.train import main as train_main
from tests.data.test_leaks import A, B, _write


def _train(tmp_path, demo_tokenizer, a, b, *extra) -> str:
    out = tmp_path / ("run" + "".join(extra).replace("-", ""))
    assert train_main(["--model", "tiny", "--tokenizer", demo_tokenizer, "--train_data", f"{a},{b}", "--dtype",
                       "fp32", "--device", "cpu", "--kernels", "off", "--micro_batch", "2", "--grad_accum", "1",
                       "--max_steps", "1", "--out_dir", str(out), *extra]) == 0
    return str(out)


def test_runs_record_the_guard_and_eval_checks_the_scored_split(tmp_path, demo_tokenizer, capsys):
    a, b = _write(tmp_path / "a", A), _write(tmp_path / "b", B)
    guarded = _train(tmp_path, demo_tokenizer, a, b)
    assert "dropped 1 train dialogues" in capsys.readouterr().out
    record = json.loads((tmp_path / "run" / "checkpoints" / "step_0000001" / "config.json").read_text())
    assert record["leak"]["dropped"] == {a: ["a_leak"]} and record["train"]["allow_overlap"] is False

    common = ["--data", b, "--split", "test", "--dtype", "fp32", "--device", "cpu", "--kernels", "off"]
    assert eval_main(["--run", guarded, "--out_dir", str(tmp_path / "ev1"), *common]) == 0
    leak = json.loads((tmp_path / "ev1" / "report.json").read_text())["leak"]
    assert leak["utterances"] == 0 and leak["scored"] == f"{b} test"

    kept = _train(tmp_path, demo_tokenizer, a, b, "--allow_overlap")
    assert "KEPT" in capsys.readouterr().out
    assert eval_main(["--run", kept, "--out_dir", str(tmp_path / "ev2"), *common]) == 2
    err = capsys.readouterr().err
    assert "shares 1 utterances (1 train dialogues" in err and "--allow_overlap" in err
    assert eval_main(["--run", kept, "--out_dir", str(tmp_path / "ev3"), "--allow_overlap", *common]) == 0
    report = json.loads((tmp_path / "ev3" / "report.json").read_text())
    assert report["leak"]["utterances"] == 1 and report["leak"]["allowed"] and report["leak"]["run_allowed_overlap"]
    assert "(overlapping train data allowed)" in report["title"]
