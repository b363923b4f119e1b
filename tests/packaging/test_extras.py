"""A command whose optional dependency is missing refuses before any work, in one line naming the extra.

The refusals run in a subprocess in which ``peft`` cannot be found, so that "before any work" is observable: torch
is never imported."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from benchmarks import extras

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HIDE_PEFT = "import sys\nsys.modules['peft'] = None  # import fails, importlib.util.find_spec answers None\n"


def run_without_peft(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", HIDE_PEFT + textwrap.dedent(code)], check=False, capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=120)


def test_aspen_bench_vs_peft_without_peft_refuses_in_one_line_before_importing_torch():
    proc = run_without_peft("""
        from aspen.cli import main
        status = main(["bench", "vs_peft", "--tiny"])
        assert "torch" not in sys.modules and "benchmarks.vs_peft" not in sys.modules, "work started"
        sys.exit(status)
    """)
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr == ("aspen bench: error: vs_peft needs peft, which is not installed: "
                           "pip install 'aspen-serve[bench]'\n")


def test_python_m_train_fused_without_peft_refuses_in_one_line():
    proc = run_without_peft("""
        import runpy
        sys.argv = ["train_fused", "--tiny"]
        runpy.run_module("benchmarks.train_fused", run_name="__main__")
    """)
    assert proc.returncode == 1
    assert proc.stderr == ("benchmarks.train_fused: train_fused needs peft, which is not installed: "
                           "pip install 'aspen-serve[bench]'\n")


def test_benchmarks_without_an_extra_always_run(monkeypatch):
    monkeypatch.setattr(extras.importlib.util, "find_spec", lambda name, *a: None)
    for name in ("lora_overhead", "engine_lora", "vs_transformers", "adapter_churn", "quantized",
                 "compute_efficiency"):
        assert extras.missing(name) is None
    with pytest.raises(extras.MissingExtra, match=r"vs_peft needs peft.*aspen-serve\[bench\]"):
        extras.require("vs_peft")


def test_with_the_extra_installed_nothing_is_refused():
    pytest.importorskip("peft")
    assert extras.missing("vs_peft") is None and extras.missing("train_fused") is None
