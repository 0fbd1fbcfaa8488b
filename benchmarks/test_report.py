"""benchmarks/report.py merges several pytest-benchmark JSON files into one report, and refuses a case given twice."""

import json

import pytest
import report


def _results(path, *names):
    benches = [{"name": n, "fullname": f"test_bench_ops.py::{n}", "group": "g", "params": {"impl": n},
                "extra_info": {"device": "cpu", "device_name": "cpu"}, "stats": {"median": 1e-3, "min": 1e-3,
                                                                                 "mean": 1e-3}}
               for n in names]
    path.write_text(json.dumps({"machine_info": {"node": "m"}, "commit_info": {}, "benchmarks": benches}))
    return str(path)


def test_several_files_make_one_report(tmp_path):
    a, b = _results(tmp_path / "a.json", "reference"), _results(tmp_path / "b.json", "fast")
    assert [x["name"] for x in report.load(a, b)["benchmarks"]] == ["reference", "fast"]
    assert report.main([a, b, "--markdown"]) == 0


def test_a_case_in_two_files_is_refused(tmp_path):
    a, b = _results(tmp_path / "a.json", "reference"), _results(tmp_path / "b.json", "reference", "fast")
    with pytest.raises(SystemExit, match=r"^report.py: g \(reference\) on cpu is in both .*a.json and .*b.json"):
        report.load(a, b)
    other = json.loads(open(b).read())  # the same cases on another machine: a section of their own
    for x in other["benchmarks"]:
        x["extra_info"]["device_name"] = "another cpu"
    (tmp_path / "c.json").write_text(json.dumps(other))
    assert len(report.collect(report.load(a, str(tmp_path / "c.json")), "median")) == 2


def test_rates_on_cuda_use_the_kernels_time(tmp_path):
    """Where the ops benchmark measured the kernels' own time (CUDA events), the bandwidth and its share of the
    device's peak come from it, not from the time per call (which holds the launch overhead)."""
    path = tmp_path / "cuda.json"
    benches = [{"name": impl, "fullname": f"t::{impl}", "group": "gaussian_sample_kl[x]-fwd-cuda-bf16",
                "params": {"impl": impl}, "stats": {"median": 50e-6},
                "extra_info": {"device": "cuda", "device_name": "NVIDIA H100 80GB HBM3", "bytes": 100_000_000,
                               "kernel_s": ks}}
               for impl, ks in (("reference", 80e-6), ("fast", 40e-6))]
    path.write_text(json.dumps({"benchmarks": benches}))
    text = report.report(report.load(str(path)), markdown=True)
    header, _, row = text.split("\n")[4:7]
    cells = dict(zip([h.strip() for h in header.split("|")], [c.strip() for c in row.split("|")]))
    assert cells["fast kernels"] == "40 us" and cells["GB/s fast"] == "2,500"  # 1e8 B / 40 us
    peak = report.find_peak("NVIDIA H100 80GB HBM3")[1]
    assert cells["% peak BW"] == report.fmt_pct(2500 / peak)
    assert "kernels: ref/fast 2.00x" in cells["notes"] and cells["ref/fast"] == "1.00x"
