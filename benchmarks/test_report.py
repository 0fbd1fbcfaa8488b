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
    with pytest.raises(SystemExit, match=r"test_bench_ops.py::reference is in both .*a.json and .*b.json"):
        report.load(a, b)
