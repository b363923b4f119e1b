"""A benchmark's report is on disk as soon as its measurements exist: marked partial until the figures derived
from them are added, left in place (and named) when a later step fails, rewritten atomically."""
from __future__ import annotations

import json
import os

import pytest

from benchmarks.common import PARTIAL, ReportFile


def read(path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def test_measurements_first_then_the_figures(tmp_path, capsys):
    path = tmp_path / "out" / "r.json"
    report = ReportFile("demo_bench", str(path))
    report.measured({"seconds": [1.0, 2.0]})
    assert read(path) == {"benchmark": "demo_bench", "seconds": [1.0, 2.0], "partial": PARTIAL}
    assert capsys.readouterr().err == f"demo_bench: measurements written to {path}\n"
    report.measured({"more_seconds": [3.0]})  # a later stage of measurements adds to the file
    assert read(path)["more_seconds"] == [3.0] and read(path)["partial"] == PARTIAL
    with report.guarded():
        figures = {"best": 1.0}
    final = report.complete(figures)
    assert final == read(path) == {"benchmark": "demo_bench", "seconds": [1.0, 2.0], "more_seconds": [3.0],
                                   "best": 1.0}
    assert json.loads(capsys.readouterr().out) == final
    assert os.listdir(path.parent) == ["r.json"]  # no temporary left behind


def test_a_failure_after_the_measurements_leaves_them_and_says_where(tmp_path, capsys):
    path = tmp_path / "r.json"
    report = ReportFile("demo_bench", str(path))
    report.measured({"seconds": [0.0]})
    with pytest.raises(ZeroDivisionError), report.guarded():
        _ = 1 / report.fields["seconds"][0]
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == (f"demo_bench: failed after its measurements were written to {path} "
                       "(ZeroDivisionError: float division by zero)")
    assert read(path) == {"benchmark": "demo_bench", "seconds": [0.0], "partial": PARTIAL}


def test_without_out_the_report_goes_under_aspen_home(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ASPEN_HOME", str(tmp_path))
    report = ReportFile("demo_bench", None)
    report.measured({"x": 1})
    assert os.path.dirname(report.path) == str(tmp_path / "bench" / "reports")
    assert os.path.basename(report.path).startswith("demo_bench-") and read(report.path)["x"] == 1


def test_a_benchmark_that_fails_deriving_its_figures_leaves_its_measurements(tmp_path, monkeypatch, capsys):
    import benchmarks.compute_efficiency as bench

    monkeypatch.setenv("ASPEN_HOME", str(tmp_path / "home"))

    def broken(xs):
        raise ValueError("no runs")

    monkeypatch.setattr(bench, "best", broken)
    out = tmp_path / "r.json"
    with pytest.raises(ValueError, match="no runs"):
        bench.main(["--tiny", "--repeats", "2", "--rows", "4", "--gemm", "64", "--out", str(out)])
    report = read(out)
    assert report["partial"] == PARTIAL and len(report["step_ms"]) == len(report["gemm_ms"]) == 2
    assert "achieved_gflops" not in report
    assert f"compute_efficiency: failed after its measurements were written to {out}" in capsys.readouterr().err
