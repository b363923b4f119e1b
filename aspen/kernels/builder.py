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
    """Find out what each claimed extension needs (keys run the compiler's preprocessor, so this runs off the
    caller's thread; a build to do takes its lock here, so that the log names exactly what this process compiles),
    say so, and run them all."""
    plans = {ext: ext.reserve() for ext in claimed}
    todo = [ext for ext in claimed if plans[ext] == "build"]
    waiting = [ext for ext in claimed if plans[ext] == "wait"]
    cached = [ext for ext in claimed if plans[ext] == "cached"]
    if todo:
        log.info("building %s, %d at a time, into %s: %s", _count(todo), min(len(todo), workers()), cache_root(),
                 _names(todo))
    if waiting:
        log.info("waiting for another process's build of %s: %s", _count(waiting), _names(waiting))
    if cached and not todo and not waiting:
        log.info("loading %s from %s", _count(cached), cache_root())
    progress = Progress(len(todo))
    for ext in claimed:  # the quick ones first, so that none waits behind a compilation
        if ext not in todo:
            _submit(ext.run)
    for ext in todo:
        _submit(ext.run, progress)


def _count(extensions: list[Extension]) -> str:
    return f"{len(extensions)} C++ extension{'' if len(extensions) == 1 else 's'}"


def _names(extensions: list[Extension]) -> str:
    return ", ".join(ext.name for ext in extensions)


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
