"""The package metadata: one version everywhere, and setup.cfg's package data naming files that exist.

Building and installing the wheel itself is the job of ``make wheel-smoke`` (.ci/wheel_smoke.sh); these checks
are the fast part of it that a source tree can answer."""
from __future__ import annotations

import configparser
import glob
import os
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version

import pytest
from setuptools import find_namespace_packages

import aspen
from benchmarks.extras import EXTRAS, NEEDS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    return cfg


def lines(value: str) -> list[str]:
    return [v.strip() for v in value.replace(",", "\n").splitlines() if v.strip()]


def test_the_version_lives_in_aspen_and_everything_reads_it():
    assert setup_cfg()["metadata"]["version"] == "attr: aspen.__version__"
    out = subprocess.run([sys.executable, "-m", "aspen.cli", "--version"], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout
    assert out == f"aspen-serve {aspen.__version__}\n"
    try:
        assert version("aspen-serve") == aspen.__version__
    except PackageNotFoundError:
        pass  # a source tree that is not installed has no metadata to compare


def test_server_version_is_the_package_version(tmp_path_factory):
    from clients.client import AspenClient
    from tests.helpers.server import ServerThread, shared_assets

    server = ServerThread(shared_assets(tmp_path_factory))
    try:
        with AspenClient(server.address, timeout=30) as client:
            assert client.model_info().server_version == aspen.__version__
    finally:
        server.stop()


def test_every_declared_data_package_is_discovered_and_matches_files():
    cfg = setup_cfg()
    find = cfg["options.packages.find"]
    packages = set(find_namespace_packages(ROOT, include=lines(find["include"]), exclude=lines(find["exclude"])))
    assert not any("__pycache__" in p for p in packages) and "benchmarks.results" not in packages
    data = cfg["options.package_data"]
    assert set(data) >= {"aspen.demo.assets", "aspen.kernels.csrc", "clients.aspen.v1"}
    for package, patterns in data.items():
        assert package in packages, f"{package} holds package data but is not a discovered package"
        folder = os.path.join(ROOT, *package.split("."))
        for pattern in lines(patterns):
            assert glob.glob(os.path.join(folder, pattern)), f"{package}: {pattern} matches no file"
    assert glob.glob(os.path.join(ROOT, "aspen", "kernels", "csrc", "*.cpp"))  # the kernels' sources ship
    shipped = os.path.join(ROOT, "clients", "aspen", "v1", "aspen.proto")  # a link to the wire contract
    assert os.path.realpath(shipped) == os.path.realpath(os.path.join(ROOT, "proto", "aspen", "v1", "aspen.proto"))


def test_the_extras_the_benchmarks_name_are_declared():
    extras = setup_cfg()["options.extras_require"]
    for extra, modules in EXTRAS.items():
        assert modules and extra in extras, f"[{extra}] is not in setup.cfg"
    assert set(NEEDS.values()) <= set(EXTRAS)
    dev = lines(extras["dev"])
    assert "aspen-serve[bench]" in dev, "the test suite runs the benchmarks: [dev] includes [bench]"
    core = lines(setup_cfg()["options"]["install_requires"])
    assert "matplotlib" in core and not any(r.startswith("peft") for r in core)


@pytest.mark.parametrize("module", ["peft", "pytest", "hypothesis"])
def test_no_core_module_imports_an_extra(module):
    """The core commands run without extras: no module of aspen, engine or clients imports one."""
    hits = []
    for top in ("aspen", "engine", "clients"):
        for path in glob.glob(os.path.join(ROOT, top, "**", "*.py"), recursive=True):
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    words = line.split()
                    if words[:2] in (["import", module], ["from", module]) or \
                            (len(words) > 1 and words[0] in ("import", "from") and words[1].startswith(module + ".")):
                        hits.append(f"{os.path.relpath(path, ROOT)}:{n}")
    assert not hits, f"{module} imported by {hits}"
