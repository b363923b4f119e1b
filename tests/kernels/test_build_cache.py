"""The build cache's key: the same for every install of the same sources (wherever the package lives), different
for different source bytes, flags, compiler or CPU capability; and where the cache lives. Nothing is compiled."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from aspen.kernels import build_cache, sgmv
from aspen.kernels.extension import CSRC, HEADER, Extension


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ASPEN_KERNEL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def install(tmp_path, where: str) -> str:
    """A copy of the package's C++ sources at ``where`` (another checkout or virtualenv)."""
    return shutil.copytree(CSRC, tmp_path / where / "aspen" / "kernels" / "csrc")


def like(ext: Extension, **changes) -> Extension:
    fields = {"name": ext.name, "sources": ext.sources, "what": ext.what, "cflags": ext.cflags,
              "ldflags": ext.ldflags, "available": ext.available, "source_dir": ext.source_dir}
    return Extension(**{**fields, **changes})


def test_two_installs_of_the_same_sources_share_one_build_directory(tmp_path, cache):
    first, second = install(tmp_path, "checkout"), install(tmp_path, "venv/lib/site-packages")
    dirs = {like(sgmv.EXTENSION, source_dir=d).build_dir() for d in (first, second, CSRC)}
    assert len(dirs) == 1
    (built,) = dirs
    assert os.path.dirname(built) == str(cache) and os.path.basename(built).startswith("sgmv-")
    assert str(tmp_path) not in os.path.basename(built)


@pytest.mark.parametrize("edited", ["sgmv.cpp", HEADER])
def test_changed_source_or_header_bytes_give_another_build_directory(tmp_path, cache, edited):
    copy = install(tmp_path, "edited")
    with open(os.path.join(copy, edited), "a") as f:
        f.write("\n// a comment is a change too\n")
    assert like(sgmv.EXTENSION, source_dir=copy).build_dir() != sgmv.EXTENSION.build_dir()


@pytest.mark.parametrize("change", [{"cflags": ("-O2", "-march=native", "-fopenmp")}, {"ldflags": ()},
                                    {"name": "sgmv2"}])
def test_changed_flags_or_name_give_another_build_directory(cache, change):
    assert like(sgmv.EXTENSION, **change).build_dir() != sgmv.EXTENSION.build_dir()


def test_cpu_capability_and_compiler_are_part_of_the_key(cache, monkeypatch):
    here = like(sgmv.EXTENSION).build_dir()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert like(sgmv.EXTENSION).build_dir() != here
    monkeypatch.undo()
    monkeypatch.setenv("ASPEN_KERNEL_CACHE", str(cache))
    monkeypatch.setattr(build_cache, "toolchain_fingerprint", lambda cflags: "another compiler")
    assert like(sgmv.EXTENSION).build_dir() != here


def test_native_flags_see_this_cpus_instruction_sets():
    """Under -march=native the compiler fingerprint is what the compiler targets here, not the flag's text."""
    native = build_cache.toolchain_fingerprint(("-march=native",))
    assert native != build_cache.toolchain_fingerprint(("-march=x86-64",)) or shutil.which("c++") is None


def test_the_key_records_torch_and_python():
    material = sgmv.EXTENSION.key().material
    assert material["torch"][0] == torch.__version__ and material["cpu_capability"]
    assert material["python"][1] and set(material["sources"]) == {"sgmv.cpp", HEADER}


def test_cache_root_is_aspen_home_kernels_unless_named(tmp_path, monkeypatch):
    monkeypatch.delenv("ASPEN_KERNEL_CACHE", raising=False)
    monkeypatch.setenv("ASPEN_HOME", str(tmp_path / "home"))
    assert build_cache.cache_root() == str(tmp_path / "home" / "kernels")
    monkeypatch.delenv("ASPEN_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert build_cache.cache_root() == str(tmp_path / "user" / ".cache" / "aspen" / "kernels")
    monkeypatch.setenv("ASPEN_KERNEL_CACHE", str(tmp_path / "elsewhere"))
    assert build_cache.cache_root() == str(tmp_path / "elsewhere")


def test_an_extension_names_a_compiled_source():
    with pytest.raises(ValueError, match="at least one .cpp/.cc/.cxx source expected"):
        Extension("headers_only", ("common.h",), "nothing to compile")
    with pytest.raises(ValueError, match="must be a Python identifier"):
        Extension("not-a-name", "x.cpp", "bad name")
