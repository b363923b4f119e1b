"""Shared pytest setup: tests marked `gpu` run only where torch sees a CUDA device; one C++ kernel build cache."""
from __future__ import annotations

import os

import pytest

from aspen.kernels.build_cache import cache_root

# Tests that point ASPEN_HOME at a temporary folder, and the servers they start, load the kernels from the one
# build cache instead of compiling them again.
os.environ.setdefault("ASPEN_KERNEL_CACHE", cache_root())


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
