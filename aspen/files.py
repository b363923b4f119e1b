"""The project's cache home and the file primitives its caches share (kernel builds, converted GGUF checkpoints,
the demo model): one place that says where ``$ASPEN_HOME`` is and how a cache entry is locked."""
from __future__ import annotations

import os


def aspen_home() -> str:
    """``$ASPEN_HOME`` if set, else ``~/.cache/aspen`` (absolute, ``~`` expanded)."""
    home = os.environ.get("ASPEN_HOME") or os.path.join("~", ".cache", "aspen")
    return os.path.abspath(os.path.expanduser(home))


def try_lock(path: str) -> int | None:
    """An open descriptor of ``path`` holding its exclusive flock, or None where another process holds it. The
    system drops the flock when the descriptor is closed or the process ends, however it ends."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def lock(path: str) -> int:
    """Like :func:`try_lock`, waiting for the flock as long as another process holds it."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except BaseException:
        os.close(fd)
        raise
    return fd
