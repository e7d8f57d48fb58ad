"""The benchmark script runs end to end at smoke size and writes a complete JSON report, dequant rows included."""
import json
import math

import pytest
import torch

from llama_erc.benchmarks import kernels as bench
from llama_erc.kernels.reference_gguf import GGUF_BLOCKS
from llama_erc.kernels.reference_nf4 import NESTED_BLOCK, NF4_BLOCK

TRAINED_OPS = ("rms_norm", "rms_norm+dw", "add_rms_norm", "swiglu", "rope", "rope_qk")
DEQUANT_OPS = tuple(f"dequant {t}" for t in ("Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K", "NF4"))


def _dequant_bytes(op: str, rows: int, cols: int) -> int:
    """Quantized bytes read + bf16 output bytes written, from the formats' layouts."""
    n = rows * cols
    kind = op.removeprefix("dequant ")
    if kind == "NF4":
        n_blocks = -(-n // NF4_BLOCK)
        read = -(-n // 2) + n_blocks + 4 * -(-n_blocks // NESTED_BLOCK) + 4 * 256  # codes, absmax, nested, map
    else:
        elems, block_bytes = GGUF_BLOCKS[kind]
        read = n // elems * block_bytes
    return read + 2 * n


def test_bench_smoke_writes_report(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--smoke", "--reps", "1", "--repeats", "2", "--warmup", "0", "--compile", "off",
                       "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    for key in ("device", "date", "torch", "triton", "git_commit", "copy_gbs", "shapes", "timer", "ops", "results",
                "repeats", "calls"):
        assert key in report, key
    assert report["copy_gbs"] > 0 and report["timer"] == "cpu-profiler" and report["repeats"] == 2
    rows = {(r["op"], r["impl"], r["pass"]) for r in report["results"]}
    assert rows == ({(op, impl, p) for op in TRAINED_OPS for impl in ("triton", "eager")
                     for p in ("fwd", "bwd", "fwd+bwd")}
                    | {(op, impl, "fwd") for op in (*DEQUANT_OPS, "rope_qk_") for impl in ("triton", "eager")}
                    | {("swiglu_bwd_", impl, "bwd") for impl in ("triton", "eager", "rows")})
    for r in report["results"]:
        assert r["ms"] > 0 and r["bytes"] > 0 and r["gbs"] > 0 and r["pct_copy"] > 0 and r["speedup_vs_eager"] > 0
        assert r["device_us"] > 0 and r["host_us"] > 0 and r["copy_us"] > 0, r
        assert r["ms"] == pytest.approx(r["device_us"] * 1e-3)
        assert r["pct_copy"] == pytest.approx(100 * r["copy_us"] / r["device_us"])
        assert r["repeats"] == 2 and len(r["device_us_runs"]) == len(r["host_us_runs"]) == 2
        for col in ("device_us", "host_us"):
            assert r[col + "_min"] <= r[col] <= r[col + "_max"], (col, r)
        assert r["kernels_per_call"] >= 0 and r["rotating_buffers"] >= 2 and r["copy_rotating_buffers"] >= 2
        assert r["through_autograd"] == (r["op"] in TRAINED_OPS), r
        assert r["via"] == ("direct call" if r["op"] not in TRAINED_OPS else bench.VIA[r["pass"]]), r
    rows_, cols = report["shapes"]["dequant"]
    assert rows_ * cols % 256 == 0  # whole K-quant blocks
    for r in report["results"]:
        if r["op"] in DEQUANT_OPS:
            assert r["shape"] == f"{rows_}x{cols}"
            assert r["bytes"] == _dequant_bytes(r["op"], rows_, cols), r
    for op in TRAINED_OPS:
        assert report["ops"][op]["passes"] == ["fwd", "bwd", "fwd+bwd"]
    (B, T), D = report["shapes"]["tokens"], report["shapes"]["dim"]
    one_pass = 4 * B * T * D * 2 + D * 2  # bf16: fwd x, r, w -> h, y; bwd dh, dy, h, w -> dx (= dr, one tensor)
    assert {r["pass"]: r["bytes"] for r in report["results"] if r["op"] == "add_rms_norm"} == \
        {"fwd": one_pass, "bwd": one_pass, "fwd+bwd": 2 * one_pass}
    M, Fd, H, Dh = B * T, report["shapes"]["ffn"], report["shapes"]["heads"], report["shapes"]["head_dim"]
    qk_bytes = 2 * 2 * M * H * Dh * 2 + 2 * T * Dh // 2 * 4  # bf16 q, k read and written; fp32 cos, sin read
    assert {(r["pass"], r["bytes"]) for r in report["results"] if r["op"] in ("rope_qk", "rope_qk_")} == \
        {("fwd", qk_bytes), ("bwd", qk_bytes), ("fwd+bwd", 2 * qk_bytes)}
    assert {r["bytes"] for r in report["results"] if r["op"] == "swiglu_bwd_"} == {5 * M * Fd * 2}
    assert report["ops"]["rope_qk_"]["passes"] == ["fwd"] and report["ops"]["swiglu_bwd_"]["passes"] == ["bwd"]
    for op in DEQUANT_OPS:  # forward only, and the outputs were checked against eager before timing
        assert report["ops"][op] == {"shape": f"{rows_}x{cols}", "passes": ["fwd"], "checked_vs_eager": True}
    table = capsys.readouterr().out
    assert "rms_norm" in table  # the table is printed
    dequant_lines = [line for line in table.splitlines() if line.startswith("dequant")]
    assert len(dequant_lines) == 2 * len(DEQUANT_OPS)
    assert all(line.split()[4] == "fwd" for line in dequant_lines)  # op is two words: op, type, shape, impl, pass


def _smoke_dequant_cases() -> list[dict]:
    return bench._dequant_cases(bench.SMOKE["dequant"], torch.bfloat16, "cpu", torch.Generator().manual_seed(0))


def test_dequant_cases_kernel_matches_twin_bit_for_bit():
    cases = _smoke_dequant_cases()
    assert [c["op"] for c in cases] == list(DEQUANT_OPS)
    for case in cases:
        kernel, twin = case["fns"]
        got, want = kernel(*case["args"]), twin(*case["args"])
        assert got.dtype == want.dtype == torch.bfloat16 and got.shape == want.shape == bench.SMOKE["dequant"]
        assert torch.isfinite(want).all() and want.abs().max() > 0, case["op"]  # finite scales, not all zero
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), case["op"]
        assert case["fwd_bytes"] == _dequant_bytes(case["op"], *bench.SMOKE["dequant"])
        assert case["bwd_bytes"] is None and list(bench._passes(kernel, case)) == ["fwd"]


def test_rotation_count_exceeds_l2_and_copy_ceiling_moves_the_bytes():
    assert bench.rotation_count(10, "cpu") == 2 and bench.rotation_count(1 << 40, "cpu") == 2
    for nbytes in (1, 1 << 20, 20 << 20, 33 << 20, 64 << 20, 1 << 30):
        k = bench.rotation_count(nbytes, "cuda")
        assert k >= 2 and (k * nbytes > bench.L2_BYTES or k == bench.MAX_SETS)
        assert k == 2 or (k - 1) * nbytes <= bench.L2_BYTES  # the fewest sets that exceed L2
    assert bench.rotation_count(20 << 20, "cuda", l2_bytes=50 << 20) == 3
    timer = bench.KernelTimer("cpu", calls=2, warmup=0, repeats=3)
    c = bench.copy_ceiling(1000, "cpu", timer)
    assert c["bytes"] == 1000 and c["rotating_buffers"] == 2 and c["device_us"] > 0 and c["gbs"] > 0
    assert c["repeats"] == 3 and c["device_us_min"] <= c["device_us"] <= c["device_us_max"]


def test_passes_rotate_over_cloned_buffer_sets():
    case = bench._cases(bench.SMOKE, torch.bfloat16, "cpu")[0]  # rms_norm, x requires grad, weight frozen
    sets = [case["args"]] + [bench.clone_args(case["args"]) for _ in range(2)]
    assert sets[1][0] is not sets[0][0] and torch.equal(sets[1][0], sets[0][0]) and sets[1][0].requires_grad
    assert not sets[1][1].requires_grad and sets[1][2] == case["args"][2]
    seen = []
    passes = bench._passes(lambda *a: (seen.append(a[0]), a[0] * a[1])[1], case, sets)
    seen.clear()
    for i in range(3):
        passes["fwd"](i)
    assert [id(t) for t in seen] == [id(s[0]) for s in sets]
    (gx,) = passes["bwd"](1)
    assert gx.shape == sets[1][0].shape
    q = _smoke_dequant_cases()[-1]["args"][0]
    q2 = bench.clone_args((q,))[0]
    assert q2.packed is not q.packed and torch.equal(q2.packed, q.packed) and q2.shape == q.shape


def test_check_outputs_refuses_a_wrong_kernel():
    case = _smoke_dequant_cases()[0]
    kernel, twin = case["fns"]
    bench.check_outputs(case, {"triton": kernel, "eager": twin})  # passes

    def off_by_one_ulp(*args):
        y = kernel(*args)
        flat = y.view(-1).view(torch.int16)
        flat[math.prod(y.shape) // 2] += 1
        return y

    with pytest.raises(RuntimeError, match="triton differs from eager in 1 of"):
        bench.check_outputs(case, {"triton": off_by_one_ulp, "eager": twin})


def test_in_place_rows_compute_what_their_baselines_compute():
    # the rows time the same function: swiglu_bwd_ (flat, in place) = the row kernel (bit for bit) = eager's
    # autograd backward (within bf16 rounding); rope_qk_ in place = its twin
    cases = {c["op"]: c for c in bench._cases(bench.SMOKE, torch.bfloat16, "cpu")}
    case = cases["swiglu_bwd_"]
    dy, g, u = bench.clone_args(case["args"])
    kernel, eager = case["fns"]
    rows = case["extra_impls"]["rows"](dy, g, u)
    want = eager(dy, g, u)
    got = kernel(dy, g.clone(), u.clone())
    for a, b, c in zip(got, rows, want):
        assert torch.equal(a, b)
        torch.testing.assert_close(a.float(), c.float(), rtol=1.6e-2, atol=1e-2)
    q, k, cos, sin = bench.clone_args(cases["rope_qk_"]["args"])
    kernel, twin = cases["rope_qk_"]["fns"]
    out, ref = kernel(q.clone(), k.clone(), cos, sin), twin(q.clone(), k.clone(), cos, sin)
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
