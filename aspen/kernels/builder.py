"""Several C++ extensions built (or loaded from the build cache) at once, beside other work.

:func:`start_build` returns at once; the builds run on background threads, as many at a time as there are cores
(each compiler run is single-threaded), and :meth:`KernelBuild.wait` waits for them. :func:`aspen.load_model`
starts the builds a model needs while it loads the weights; the engine and the trainer wait for them before their
first step, so that no request or step compiles anything.

The log says ``building`` only for what it compiles — one line naming them, then one per finished build with its
seconds — and loading cached builds takes one line. The threads are not daemons: a process that exits during a
build finishes it first, so that the next start finds it in the cache.
"""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from aspen.kernels.build_cache import cache_root
from aspen.kernels.extension import Extension, Progress

log = logging.getLogger("aspen.kernels")

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


@dataclass(frozen=True)
class KernelBuild:
    """Extensions being built or loaded in the background."""

    extensions: tuple[Extension, ...]

    def wait(self) -> dict[str, bool]:
        """{extension name: available}, once every one of them is built, loaded or known to be unavailable."""
        return {ext.name: ext.get() is not None for ext in self.extensions}


def start_build(extensions: Iterable[Extension]) -> KernelBuild:
    """Start building or loading every extension of ``extensions`` that no thread has started yet; returns at
    once. Extensions already started (by an earlier call, or by a first use) are waited for by ``wait``."""
    extensions = tuple(extensions)
    claimed = [ext for ext in extensions if ext.claim()]
    if claimed:
        _submit(_dispatch, claimed)
    return KernelBuild(extensions)


def build_now(extensions: Iterable[Extension]) -> dict[str, bool]:
    """Build or load ``extensions`` (in parallel) and wait for them: {extension name: available}."""
    return start_build(extensions).wait()


def workers() -> int:
    """How many builds run at a time: the cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _dispatch(claimed: list[Extension]) -> None:
    """Sort the claimed extensions into cached and to-build (computing keys runs the compiler's preprocessor, so
    it happens here, off the caller's thread), say which will be built, and run them all."""
    wanted = [ext for ext in claimed if _wanted(ext)]
    todo = [ext for ext in wanted if not _built(ext)]
    if todo:
        log.info("building %d C++ extension%s, %d at a time, into %s: %s", len(todo), "" if len(todo) == 1 else "s",
                 min(len(todo), workers()), cache_root(), ", ".join(ext.name for ext in todo))
    elif wanted:
        log.info("loading %d C++ extension%s from %s", len(wanted), "" if len(wanted) == 1 else "s", cache_root())
    progress = Progress(len(todo))
    for ext in claimed:  # the quick loads first, so that none waits behind a compilation
        if ext not in todo:
            _submit(ext.run)
    for ext in todo:
        _submit(ext.run, progress)


def _wanted(ext: Extension) -> bool:
    try:
        return ext.wanted()
    except Exception:  # noqa: BLE001 -- its run reports the reason
        return True


def _built(ext: Extension) -> bool:
    try:
        return ext.is_built()
    except Exception:  # noqa: BLE001 -- unreadable sources and the like: its run reports the reason
        return False


def _submit(fn: Callable, *args) -> None:
    """Run ``fn(*args)`` on the build threads; inline while the interpreter shuts down (no new threads then)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=workers(), thread_name_prefix="aspen-kernels")
    try:
        _pool.submit(fn, *args)
    except RuntimeError:
        fn(*args)
