"""benchmarks/linear.py: the round order and the read paired with each M = 1 call (no timings
asserted: speed belongs in the benchmark's JSON)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from qatpass.kernels.cpu.native import kernel_unavailable_reason


def _benchmark(name: str):
    """benchmarks/<name>.py as a module."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"qatpass_bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


lin = _benchmark("linear")
budget = _benchmark("cpu_op_budget")


def test_rounds_alternate_their_order_so_each_variant_follows_every_other():
    calls: list[str] = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    lin.timed_ms(fns, repeats=4, budget_s=10.0)
    assert calls[3:] == list("abccbaabccba")  # after one warm-up call each
    assert all(len(t["rounds"]) == 4 for t in lin.timed_ms(fns, 4, 10.0).values())


def test_paired_pct_is_the_read_time_over_the_kernel_time_per_round():
    got = lin.paired_pct([2.0, 1.0, 4.0, 1.0], [1.0, 1.0, 1.0, 0.5])
    assert got["median"] == pytest.approx(50.0)  # rounds: 50, 100, 25, 50 %
    assert got["q1"] <= got["median"] <= got["q3"]


@pytest.mark.skipif(kernel_unavailable_reason() is not None, reason="no native CPU kernel")
def test_m1_rows_report_the_paired_read(tmp_path):
    out = tmp_path / "linear.json"
    result = lin.main(["--quick", "--threads", "1", "--group-sizes", "32", "--variants",
                       "bf16,qatpass", "--repeats", "3", "--budget-s", "0.05", "--out", str(out)])  # fmt: skip
    rows = {r["M"]: r for r in result["cpu"]}
    assert rows[1]["read_ms"] > 0 and 0 < rows[1]["qatpass_pct_of_paired_read"]
    q1, q3 = rows[1]["qatpass_pct_of_paired_read_iqr"]
    assert q1 <= rows[1]["qatpass_pct_of_paired_read"] <= q3
    assert "read_ms" not in rows[4] and "qatpass_pct_of_paired_read" not in rows[4]
    assert rows[1]["qatpass_max_abs_diff_vs_dequant_ref"] < 0.05
    (overhead,) = result["call_overhead"]
    assert overhead["threads"] == 1 and overhead["c_call_us"] > 0 and overhead["module_us"] > 0
    assert overhead["overhead_us"] == overhead["module_us"] - overhead["c_call_us"]  # no timing
    assert out.exists()


@pytest.mark.skipif(kernel_unavailable_reason() is not None, reason="no native CPU kernel")
def test_batched_rows_report_their_share_of_the_dot_peak():
    result = lin.main(["--quick", "--threads", "1", "--group-sizes", "32", "--variants",
                       "bf16,qatpass", "--ms", "16", "--repeats", "3", "--budget-s", "0.05"])  # fmt: skip
    (row,) = result["cpu"]
    assert row["dot_peak_gflops"] > 0
    for key in ("bf16", "qatpass"):
        want = 2 * 16 * row["N"] * row["K"] / (row[f"{key}_ms"] * 1e-3) / 1e9
        assert row[f"{key}_gflops"] == pytest.approx(want)
        assert row[f"{key}_pct_of_dot_peak"] == pytest.approx(100 * want / row["dot_peak_gflops"])


def test_llama_cpp_rows_are_parsed_from_test_backend_ops_output():
    text = (
        "  MUL_MAT(type_a=q4_0,type_b=f32,m=4096,n=1,k=14336,bs=[1,1],nr=[1,1],per=[0,1,2,3],"
        "k_v=0,o=1):    276 runs -  4333.66 us/run - 117.44 MFLOP/run -  27.10 GFLOPS\n"
        "  MUL_MAT(type_a=q4_0,type_b=f32,m=4096,n=8,k=14336,bs=[1,1]):   80 runs - 11252.00 us/run\n"
        "  MUL_MAT(type_a=q8_0,type_b=f32,m=4096,n=1,k=14336,bs=[1,1]):  300 runs -  5000.00 us/run\n"
        "  MUL_MAT(type_a=q4_0,type_b=f32,m=4096,n=1,k=4096,bs=[1,1]):   900 runs -  1000.00 us/run\n"
    )
    rows = _benchmark("llama_cpp_q4_0").parse(text)
    assert sorted(rows) == [1, 8]  # other types and shapes are left out
    assert rows[1]["us"] == 4333.66 and rows[1]["runs"] == 276
    assert rows[8]["us"] == 11252.0


def test_op_budget_mixes_rotate_destinations_and_count_the_line():
    body = budget.asm_body(["vpsrlw", "vdpbf16ps", "vdpbf16ps"]).replace("%%", "%").split("\\n\\t")
    assert len(body) == 3 * budget.UNROLL
    # writes rotate over zmm12..19 and accumulators over zmm0..11; sources zmm20/21 only read
    dests = [line.rsplit("%", 1)[1] for line in body]
    assert dests[:3] == ["zmm12", "zmm0", "zmm1"] and dests[3:6] == ["zmm13", "zmm2", "zmm3"]
    ops = budget.MIXES["m1_line"]
    assert (ops.count("vpsrlw"), ops.count("vpermw"), ops.count("vdpbf16ps")) == (3, 5, 4)


@pytest.mark.skipif(kernel_unavailable_reason() is not None, reason="no native CPU kernel")
def test_op_budget_reports_cycles_and_the_decode_ceiling():
    result = budget.run(iters=20_000, repeats=1, read_gbps=25.0)
    rows = {row["name"]: row for row in result["rows"]}
    assert set(rows) == set(budget.SINGLES) | set(budget.MIXES)
    assert result["ghz"] > 0 and all(row["cycles"] > 0 for row in rows.values())
    line = rows["m1_line"]
    assert line["vector_ops"] == 13
    assert line["decode_gbps_ceiling"] == pytest.approx(64 * result["ghz"] / line["cycles"])
    assert line["ceiling_over_read"] == pytest.approx(line["decode_gbps_ceiling"] / 25.0)
