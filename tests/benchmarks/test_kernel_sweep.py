"""The launch-config sweep runs end to end on CPU (interpreter, tiny shapes), labelled a dry run, and refuses a
config whose output differs from the default config's."""
import json

import pytest

from llama_erc.benchmarks import kernel_sweep as ks


def test_sweep_dry_run_writes_winners(tmp_path, capsys):
    out = tmp_path / "sweep.json"
    assert ks.main(["--out", str(out), "--only", "swiglu bwd", "rope_qk bwd H=4 Hkv=1"]) == 0
    report = json.loads(out.read_text())
    assert report["label"].startswith("cpu dry run") and report["timer"] == "cpu-profiler" and report["smoke"]
    assert set(report["winners"]) == {"swiglu bwd (flat, in place)", "rope_qk bwd H=4 Hkv=1"}
    for name, sizes in (("swiglu bwd (flat, in place)", ks.FLAT_BLOCKS), ("rope_qk bwd H=4 Hkv=1", ks.ROWS)):
        rows = [r for r in report["results"] if r["launch"] == name]
        assert {(r["size"], r["num_warps"]) for r in rows} == {(s, w) for s in sizes for w in ks.WARPS}
        assert sum(r["default"] for r in rows) == 1 and all(r["device_us"] > 0 for r in rows)
        best = min(rows, key=lambda r: r["device_us"])
        w = report["winners"][name]
        assert (w["size"], w["num_warps"], w["device_us"]) == (best["size"], best["num_warps"], best["device_us"])
        assert w["speedup_vs_default"] >= 1.0
    assert "cpu dry run" in capsys.readouterr().out


def test_sweep_refuses_a_config_that_changes_the_result():
    launch = next(x for x in ks._launches(ks.SMOKE, "cpu") if x["name"] == "swiglu fwd")
    ks._check_same(launch, 2, 4)  # a tiling of the same op: passes
    run = launch["run"]

    def wrong_when_not_default(a, s, nw):
        y = run(a, s, nw)
        return y if (s, nw) == tuple(launch["default"]) else y * 1.01
    launch["run"] = wrong_when_not_default
    with pytest.raises(RuntimeError, match="swiglu fwd: size 2, num_warps 4 differs from the default config"):
        ks._check_same(launch, 2, 4)


def test_sweep_only_must_match():
    with pytest.raises(ValueError, match="matches no launch; names: rms_norm fwd"):
        ks.sweep(True, 1, 0, 1, "cpu", only=("no such",))
