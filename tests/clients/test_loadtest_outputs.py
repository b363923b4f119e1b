"""The load tester never loses its measurements: report.json is on disk before anything is derived from it, a
later step that fails leaves it and says so, and without matplotlib the plots are skipped with the reason.

No server here: the runs are made up, and ``aspen loadtest run`` is driven with its network calls replaced."""
from __future__ import annotations

import argparse
import importlib.util
import json
import os

import pytest

from clients.loadtest import command, report
from clients.loadtest.driver import RequestResult, RunResult

PNG = b"\x89PNG\r\n\x1a\n"


def make_run(label: str, rate: float, n: int = 6) -> RunResult:
    results = [RequestResult(i, f"adapter-{i % 2:04d}", 8, 4, 0.1 * i, start=0.1 * i, end=0.1 * i + 0.5,
                             first_token=0.1 * i + 0.2, last_token=0.1 * i + 0.5, output_tokens=4, prompt_tokens=8)
               for i in range(n)]
    return RunResult(label, rate, results, wall_s=0.1 * n + 0.5)


RUNS = [make_run("rate=2", 2.0), make_run("rate=4", 4.0)]


def read(path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def raising(error: Exception):
    def fail(*_):
        raise error

    return fail


def without_matplotlib(monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))


def test_report_then_plots(tmp_path):
    out = report.write_outputs(RUNS, {"server": "x"}, str(tmp_path))
    assert set(out.files) == {"json", "cdf", "sweep"} and not out.skipped and not out.failed
    written = read(tmp_path / "report.json")
    assert written == json.loads(json.dumps(out.report))
    assert [r["summary"]["label"] for r in written["runs"]] == ["rate=2", "rate=4"]
    assert all(len(r["requests"]) == 6 for r in written["runs"])
    for name in ("latency_cdf.png", "sweep.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG
    assert sorted(os.listdir(tmp_path)) == ["latency_cdf.png", "report.json", "sweep.png"]  # no temporary left


def test_without_matplotlib_the_report_is_written_and_the_plots_skipped_with_the_reason(tmp_path, monkeypatch):
    without_matplotlib(monkeypatch)
    out = report.write_outputs(RUNS, {}, str(tmp_path))
    assert out.files == {"json": str(tmp_path / "report.json")} and not out.failed
    assert out.skipped == ["plots skipped: " + report.plotting_unavailable()]
    assert "matplotlib is not installed" in out.skipped[0]
    assert read(tmp_path / "report.json")["runs"][0]["summary"]["ok"] == 6
    assert sorted(os.listdir(tmp_path)) == ["report.json"]


def test_a_failing_plot_leaves_the_report_and_the_other_plot(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "plot_cdfs", raising(ValueError("no axes")))
    out = report.write_outputs(RUNS, {}, str(tmp_path))
    assert out.failed == ["latency_cdf.png not written (ValueError: no axes)"]
    assert set(out.files) == {"json", "sweep"} and "summary" in read(tmp_path / "report.json")["runs"][0]


def test_a_failing_summary_leaves_every_request_record(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "summarize", raising(ZeroDivisionError("wall time")))
    out = report.write_outputs(RUNS, {"server": "x"}, str(tmp_path))
    assert out.failed == ["summarizing failed (ZeroDivisionError: wall time)"] and out.summaries == []
    written = read(tmp_path / "report.json")
    assert written["config"] == {"server": "x"} and [len(r["requests"]) for r in written["runs"]] == [6, 6]
    assert not any("summary" in r for r in written["runs"])


@pytest.fixture
def offline_command(monkeypatch):
    """``aspen loadtest run`` against no server: model_info and the sweep return made-up values."""
    from types import SimpleNamespace

    from aspen.cli import build_parser

    info = SimpleNamespace(base_model="demo", device="cpu", vocab_size=320, max_context_tokens=512)
    monkeypatch.setattr(command, "model_info", lambda driver: info)
    monkeypatch.setattr(command, "run_sweep", lambda *a: RUNS)

    def args(out_dir) -> argparse.Namespace:
        return build_parser().parse_args(["loadtest", "run", "--out-dir", str(out_dir), "--no-progress"])

    return args


def test_command_without_matplotlib_says_the_plots_were_skipped_and_why(offline_command, tmp_path, monkeypatch,
                                                                         capsys):
    without_matplotlib(monkeypatch)
    assert command.run(offline_command(tmp_path)) == 0
    captured = capsys.readouterr()
    assert "rate=2" in captured.out and f"wrote {tmp_path / 'report.json'}" in captured.out
    assert captured.err == "aspen loadtest: plots skipped: matplotlib is not installed (pip install matplotlib; " \
                           "the aspen-serve package depends on it)\n"
    assert os.listdir(tmp_path) == ["report.json"]


def test_command_reports_a_failed_step_with_where_the_measurements_are(offline_command, tmp_path, monkeypatch,
                                                                        capsys):
    monkeypatch.setattr(report, "plot_sweep", raising(OSError("disk full")))
    assert command.run(offline_command(tmp_path)) == 1
    err = capsys.readouterr().err
    assert err == (f"aspen loadtest: sweep.png not written (OSError: disk full); the measurements are in "
                   f"{tmp_path / 'report.json'}\n")
    assert (tmp_path / "latency_cdf.png").exists() and read(tmp_path / "report.json")["runs"][1]["summary"]
