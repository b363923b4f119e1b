"""A C++ extension compiled on first use (``torch.utils.cpp_extension.load_inline``, into torch's extension cache,
so once per machine), or None where it cannot be built: callers then keep their pure-torch paths.

``ASPEN_CPU_KERNELS=0`` (or false/no/off) turns every extension off.

Built lazily, an extension would be compiled by the first call that needs it — on a fresh machine, inside the
first request a server answers (≈45 s for the demo model). :func:`build_now` compiles a set of them up front, in
parallel (each compiler run is single-threaded), and the engine calls it before it reports ready.
"""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger("aspen.kernels")


def cpu_has_avx512() -> bool:
    """Whether torch runs this CPU at an AVX-512 capability (what the AVX-512-only kernels are built for)."""
    import torch

    return torch.backends.cpu.get_cpu_capability() in ("AVX512", "AVX512_BF16", "AMX")


class LazyExtension:
    def __init__(self, name: str, source: str, functions: Sequence[str], what: str,
                 cflags: Sequence[str] = ("-O2",), ldflags: Sequence[str] = (),
                 available: Callable[[], bool] = lambda: True) -> None:
        self.name, self.source, self.functions, self.what = name, source, list(functions), what
        self.cflags, self.ldflags, self.available = list(cflags), list(ldflags), available
        self._module = None
        self._failed = False
        self._lock = threading.Lock()

    def get(self):
        """The compiled module, or None when it is turned off, not applicable here or failed to build."""
        if self._module is not None or self._failed:
            return self._module
        if os.environ.get("ASPEN_CPU_KERNELS", "1").lower() in ("0", "false", "no", "off") or not self.available():
            self._failed = True
            return None
        with self._lock:
            if self._module is None and not self._failed:
                try:
                    from torch.utils.cpp_extension import load_inline

                    log.info("building the %s (once per machine)...", self.what)
                    self._module = load_inline(name=self.name, cpp_sources=self.source, functions=self.functions,
                                               extra_cflags=self.cflags, extra_ldflags=self.ldflags,
                                               verbose=False)
                except Exception as e:  # noqa: BLE001 -- no compiler, headers or symbols: the torch path still works
                    log.warning("%s unavailable (%s); using the torch paths", self.what, e)
                    self._failed = True
        return self._module


def build_now(extensions: Iterable[LazyExtension]) -> dict[str, bool]:
    """Compile (or load from the cache) every extension not yet tried, in parallel; {name: available}."""
    todo = list(extensions)
    if todo:
        with ThreadPoolExecutor(max_workers=min(len(todo), os.cpu_count() or 1), thread_name_prefix="build") as pool:
            list(pool.map(LazyExtension.get, todo))
    return {ext.name: ext.get() is not None for ext in todo}
