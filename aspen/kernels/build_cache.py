"""Where a C++ extension's build lives: ``<cache root>/<name>-<key>/``, the key a hash of everything the compiled
library depends on and of nothing else.

The key covers the source files' bytes (by file name, not path), the compiler flags, what the compiler makes of
those flags on this machine (its predefined macros under them: the compiler and its version, and under
``-march=native`` the instruction sets of this CPU), torch's CPU capability, torch's version and build, and the
Python ABI. It never covers the path of the installed package: any number of installs of the project (checkouts,
virtualenvs) on one machine share one build of each extension, and a changed source, flag, compiler, CPU or torch
gets a build of its own instead of replacing another's.

The cache root is ``$ASPEN_KERNEL_CACHE`` if set, else ``$ASPEN_HOME/kernels`` (``ASPEN_HOME`` defaults to
``~/.cache/aspen``, as for the project's other caches).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys
import sysconfig
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from aspen.files import aspen_home

#: Part of every key: changed when the way a build is made changes in a way the rest of the key does not show.
RECIPE = 1
#: Hex digits of the key in a build directory's name (64 bits: no two builds in one cache collide by chance).
SHORT = 16


def cache_root() -> str:
    """The folder that holds every extension's build directories."""
    explicit = os.environ.get("ASPEN_KERNEL_CACHE")
    if explicit:
        return os.path.abspath(os.path.expanduser(explicit))
    return os.path.join(aspen_home(), "kernels")


@dataclass(frozen=True)
class BuildKey:
    """The hash that names one build, and what it was computed from (kept beside the build, for whoever reads it)."""

    digest: str
    material: Mapping[str, object]

    @property
    def short(self) -> str:
        return self.digest[:SHORT]


def build_key(name: str, sources: Mapping[str, bytes], cflags: Sequence[str], ldflags: Sequence[str]) -> BuildKey:
    """The key of extension ``name`` built from ``sources`` ({file name: bytes}) with these flags, on this machine
    with this compiler, torch and Python."""
    import torch

    material = {
        "recipe": RECIPE,
        "name": name,
        "sources": {f: hashlib.sha256(data).hexdigest() for f, data in sorted(sources.items())},
        "cflags": list(cflags),
        "ldflags": list(ldflags),
        "compiler": toolchain_fingerprint(tuple(cflags)),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": [torch.__version__, torch.version.git_version, torch.version.cuda, torch.version.hip],
        "python": [sys.implementation.name, sysconfig.get_config_var("EXT_SUFFIX"), sys.abiflags],
    }
    digest = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()
    return BuildKey(digest, material)


@functools.cache
def toolchain_fingerprint(cflags: tuple[str, ...]) -> str:
    """A hash of the macros the C++ compiler torch uses (``$CXX``, else ``c++``) predefines under ``cflags``: they
    name the compiler and its version and, with ``-march=native``, every instruction set it targets here — what
    the sources' ``#if defined(__AVX512F__)`` and the code generation see. Falls back to ``--version`` where the
    flags are refused, and to a fixed string where there is no compiler (the build then fails and says why)."""
    from torch.utils.cpp_extension import get_cxx_compiler

    cxx = get_cxx_compiler()
    for command in ([cxx, *cflags, "-dM", "-E", "-x", "c++", os.devnull], [cxx, "--version"]):
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)
        except (OSError, subprocess.SubprocessError):
            continue
        lines = sorted(done.stdout.splitlines())
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()
    return f"no compiler {cxx!r}"
