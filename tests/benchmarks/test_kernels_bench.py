"""The benchmark script runs end to end at smoke size and writes a complete JSON report."""
import json

from llama_erc.benchmarks import kernels as bench


def test_bench_smoke_writes_report(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--smoke", "--reps", "1", "--warmup", "0", "--compile", "off", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    for key in ("device", "date", "torch", "triton", "git_commit", "copy_gbs", "shapes", "timer", "results"):
        assert key in report, key
    assert report["copy_gbs"] > 0
    rows = {(r["op"], r["impl"], r["pass"]) for r in report["results"]}
    assert rows == {(op, impl, p) for op in ("rms_norm", "rms_norm+dw", "swiglu", "rope")
                    for impl in ("triton", "eager") for p in ("fwd", "bwd", "fwd+bwd")}
    for r in report["results"]:
        assert r["ms"] > 0 and r["bytes"] > 0 and r["gbs"] > 0 and r["pct_copy"] > 0 and r["speedup_vs_eager"] > 0
    assert "rms_norm" in capsys.readouterr().out  # the table is printed
