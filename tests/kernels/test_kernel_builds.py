"""Builds end to end: two installs of the project on one machine share one build of each extension (started
alternately, neither rebuilds the other's); two processes that start the same first build at once compile it once;
the log says "building" only where this process compiles.

The project's own extensions come from the suite's build cache (built once per machine, like every kernel test
needs them); the first-build checks compile one tiny extension into a temporary ASPEN_HOME.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import pytest

import aspen
from aspen.kernels.builder import build_now
from aspen.kernels.catalog import all_extensions
from aspen.kernels.extension import MARKER, Extension

REPO = os.path.dirname(os.path.dirname(os.path.abspath(aspen.__file__)))
TINY = """#include <pybind11/pybind11.h>
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("answer", [] { return 42; }); }
"""
LOGGING = ("import logging, sys\n"
           "logging.basicConfig(level=logging.DEBUG, stream=sys.stderr, format='%(name)s: %(message)s')\n")
LOAD_ALL = LOGGING + """import json, aspen
from aspen.kernels.builder import build_now
from aspen.kernels.catalog import all_extensions
exts = all_extensions()
available = build_now(exts)
print(json.dumps({"aspen": aspen.__file__, "available": available, "dirs": {e.name: e.build_dir() for e in exts},
                  "files": {e.name: e.get().__file__ for e in exts if e.get() is not None}}))
"""
LOAD_TINY = LOGGING + """import json
from aspen.kernels.builder import build_now
from aspen.kernels.extension import Extension
ext = Extension("tiny", "tiny.cpp", "a test extension", source_dir=sys.argv[1])
available = build_now([ext])
print(json.dumps({"available": available, "answer": ext.get().answer(), "dir": ext.build_dir()}))
"""


def kernel_log(stderr: str) -> str:
    return "\n".join(line for line in stderr.splitlines() if line.startswith("aspen.kernels"))


def run_python(script: str, *args: str, cwd: str, env: dict) -> tuple[dict, str]:
    done = subprocess.run([sys.executable, "-c", script, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1]), kernel_log(done.stderr)


def test_two_installs_started_alternately_never_rebuild_each_others_kernels(tmp_path):
    here = build_now(all_extensions())  # this install: from the suite's cache (or built once, like any kernel test)
    dirs = {ext.name: ext.build_dir() for ext in all_extensions()}
    second = tmp_path / "second-install"
    shutil.copytree(os.path.join(REPO, "aspen"), second / "aspen",
                    ignore=shutil.ignore_patterns("__pycache__", "assets"))
    for install in (str(second), REPO):
        env = {**os.environ, "PYTHONPATH": install}
        report, log = run_python(LOAD_ALL, cwd=install, env=env)
        assert report["aspen"].startswith(install + os.sep)
        assert report["available"] == here and report["dirs"] == dirs
        assert all(os.path.dirname(f) == dirs[name] for name, f in report["files"].items())
        assert "building" not in log and "built" not in log, log


def tiny_install(root, name: str) -> str:
    source_dir = root / name / "csrc"
    source_dir.mkdir(parents=True)
    (source_dir / "tiny.cpp").write_text(TINY)
    return str(source_dir)


def test_concurrent_first_builds_compile_once_and_another_install_loads_the_build(tmp_path, monkeypatch, caplog):
    env = {key: value for key, value in os.environ.items() if key != "ASPEN_KERNEL_CACHE"}
    env["ASPEN_HOME"] = str(tmp_path / "home")
    env["PYTHONPATH"] = REPO
    first, second, third = (tiny_install(tmp_path, name) for name in ("checkout", "venv", "third"))
    procs = [subprocess.Popen([sys.executable, "-c", LOAD_TINY, source_dir], cwd=REPO, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for source_dir in (first, second)]
    outcomes = [proc.communicate(timeout=600) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outcomes
    reports = [json.loads(out.splitlines()[-1]) for out, _ in outcomes]
    logs = [kernel_log(err) for _, err in outcomes]
    assert [r["answer"] for r in reports] == [42, 42] and reports[0]["dir"] == reports[1]["dir"]
    assert os.path.dirname(reports[0]["dir"]) == str(tmp_path / "home" / "kernels")
    assert sum("built tiny in" in log for log in logs) == 1, logs
    builder, other = sorted(logs, key=lambda log: "built tiny in" not in log)
    assert "building 1 C++ extension" in builder and "tiny" in builder
    assert "building" not in other and "loaded tiny" in other, other
    assert os.path.isfile(os.path.join(reports[0]["dir"], MARKER))

    monkeypatch.delenv("ASPEN_KERNEL_CACHE", raising=False)
    monkeypatch.setenv("ASPEN_HOME", env["ASPEN_HOME"])
    caplog.set_level(logging.DEBUG, logger="aspen.kernels")
    ext = Extension("tiny", "tiny.cpp", "a test extension", source_dir=third)
    assert build_now([ext]) == {"tiny": True} and ext.get().answer() == 42
    assert ext.build_dir() == reports[0]["dir"]
    assert "building" not in caplog.text and "loaded tiny" in caplog.text


def test_a_failed_build_leaves_the_extension_off_and_no_build_behind(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("ASPEN_KERNEL_CACHE", raising=False)
    monkeypatch.setenv("ASPEN_HOME", str(tmp_path / "home"))
    source_dir = tmp_path / "csrc"
    source_dir.mkdir()
    (source_dir / "broken.cpp").write_text("#error this source does not compile\n")
    ext = Extension("broken", "broken.cpp", "a test extension", source_dir=str(source_dir))
    with caplog.at_level(logging.INFO, logger="aspen.kernels"):
        assert ext.get() is None and ext.tried
    assert "building broken" in caplog.text and "unavailable" in caplog.text and "built" not in caplog.text
    assert not os.path.exists(os.path.join(ext.build_dir(), MARKER))


def test_turned_off_extensions_build_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("ASPEN_CPU_KERNELS", "0")
    monkeypatch.setenv("ASPEN_KERNEL_CACHE", str(tmp_path / "cache"))
    ext = Extension("tiny", "tiny.cpp", "a test extension", source_dir=tiny_install(tmp_path, "off"))
    assert build_now([ext]) == {"tiny": False}
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("device_type, packed, expected", [
    ("cpu", True, {"adapter_kernels", "cpu_kernels", "fused_ops", "sgmv", "mkl_packed", "panel_gemm"}),
    ("cpu", False, {"adapter_kernels", "cpu_kernels", "fused_ops", "sgmv"}),
    ("cuda", True, {"adapter_kernels"}),
])
def test_the_extensions_a_model_uses(device_type, packed, expected):
    from aspen.kernels.catalog import extensions_for

    assert {ext.name for ext in extensions_for(device_type, packed)} == expected
