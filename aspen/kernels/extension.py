"""A C++ extension built from its sources under ``aspen/kernels/csrc`` on first use, into the shared build cache
(:mod:`aspen.kernels.build_cache`), or None where it cannot be built: callers then keep their pure-torch paths.

``ASPEN_CPU_KERNELS=0`` (or false/no/off) turns every extension off.

A build directory holds a copy of the sources it was built from (so that no build depends on where the package is
installed), torch's build files and the library, and ``build.json``, written last: a directory that has it holds a
complete build, which is imported as it is. Without it, a process takes the directory's lock (``build.lock``, a
``flock``, which the system drops when the process ends, however it ends), looks again, and builds with
``torch.utils.cpp_extension.load``; another process that wants the same build meanwhile waits for the lock and
then imports what the first one built. :mod:`aspen.kernels.builder` builds several extensions at once.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from types import ModuleType

from aspen.files import lock, try_lock
from aspen.kernels.build_cache import BuildKey, build_key, cache_root

log = logging.getLogger("aspen.kernels")

#: The C++ sources of the project's extensions (shipped with the package).
CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
#: The header every extension of the project includes (in CSRC).
HEADER = "aspen_extension.h"
MARKER = "build.json"
LOCK = "build.lock"
_COMPILED = (".cpp", ".cc", ".cxx")


def kernels_enabled() -> bool:
    """False when ``ASPEN_CPU_KERNELS`` turns the extensions off (0, false, no or off)."""
    return os.environ.get("ASPEN_CPU_KERNELS", "1").lower() not in ("0", "false", "no", "off")


def cpu_has_avx512() -> bool:
    """Whether torch runs this CPU at an AVX-512 capability (what the AVX-512-only kernels are built for)."""
    import torch

    return torch.backends.cpu.get_cpu_capability() in ("AVX512", "AVX512_BF16", "AMX")


class Progress:
    """The count of finished builds in one batch, for the log line of each."""

    def __init__(self, total: int) -> None:
        self.total, self._finished, self._lock = total, 0, threading.Lock()

    def step(self) -> str:
        with self._lock:
            self._finished += 1
            return f" ({self._finished} of {self.total})"


class Extension:
    """One C++ extension: its sources (file names under ``source_dir``, by default :data:`CSRC`; the ``.cpp`` files
    are compiled, any other is a header they include), its flags, and whether it applies on this machine
    (``available``). :meth:`get` builds or loads it once per process."""

    def __init__(self, name: str, sources: str | Sequence[str], what: str, cflags: Sequence[str] = ("-O2",),
                 ldflags: Sequence[str] = (), available: Callable[[], bool] = lambda: True,
                 source_dir: str | None = None) -> None:
        if not name.isidentifier():
            raise ValueError(f"Extension: the name must be a Python identifier, got {name!r}")
        self.name, self.what = name, what
        self.sources = (sources,) if isinstance(sources, str) else tuple(sources)
        if not any(f.endswith(_COMPILED) for f in self.sources):
            raise ValueError(f"Extension {name}: at least one {'/'.join(_COMPILED)} source expected, "
                             f"got {self.sources}")
        self.cflags, self.ldflags, self.available = tuple(cflags), tuple(ldflags), available
        self.source_dir = source_dir or CSRC
        self._module: ModuleType | None = None
        self._claimed = False
        self._claim_lock = threading.Lock()
        self._done = threading.Event()
        self._source_bytes: dict[str, bytes] | None = None
        self._key: BuildKey | None = None
        self._plan = ""  # what reserve() found
        self._lock_fd: int | None = None  # the build lock's descriptor (flock held) while this process holds it

    def __repr__(self) -> str:
        return f"Extension({self.name!r}, {self.sources})"

    # ---- what and where -------------------------------------------------------------------------------------
    def wanted(self) -> bool:
        """Whether this extension is turned on and applies on this machine."""
        return kernels_enabled() and self.available()

    def source_bytes(self) -> dict[str, bytes]:
        """{file name: bytes} of the sources, read once: the key and the build use the same bytes."""
        if self._source_bytes is None:
            data = {}
            for f in self.sources:
                with open(os.path.join(self.source_dir, f), "rb") as fh:
                    data[f] = fh.read()
            self._source_bytes = data
        return self._source_bytes

    def key(self) -> BuildKey:
        if self._key is None:
            self._key = build_key(self.name, self.source_bytes(), self.cflags, self.ldflags)
        return self._key

    def build_dir(self) -> str:
        """This build's directory in the cache: the same for every install with the same sources, flags,
        compiler, torch and Python."""
        return os.path.join(cache_root(), f"{self.name}-{self.key().short}")

    def is_built(self) -> bool:
        """Whether the cache holds a complete build (then :meth:`get` only imports it)."""
        return os.path.isfile(os.path.join(self.build_dir(), MARKER))

    # ---- once per process -----------------------------------------------------------------------------------
    @property
    def tried(self) -> bool:
        """Whether this process has built or loaded the extension, or found that it cannot."""
        return self._done.is_set()

    def get(self) -> ModuleType | None:
        """The module, or None when it is turned off, does not apply here or cannot be built. Waits for a build
        another thread has started."""
        if not self._done.is_set():
            if self.claim():
                self.run()
            else:
                self._done.wait()
        return self._module

    def claim(self) -> bool:
        """Take the job of building or loading this extension in this process: True for exactly one caller, which
        must then call :meth:`run`."""
        with self._claim_lock:
            if self._claimed:
                return False
            self._claimed = True
            return True

    def reserve(self) -> str:
        """After :meth:`claim`, before :meth:`run`: what the run will do. "off" (turned off or not applicable
        here), "cached" (a complete build is there to import), "build" (this process now holds the build lock and
        will compile), "wait" (another process holds it: the run waits, then imports its build), or "unknown"
        (the run finds out, and reports any failure)."""
        self._plan = self._reserve()
        return self._plan

    def _reserve(self) -> str:
        try:
            if not self.wanted():
                return "off"
            if self.is_built():
                return "cached"
            directory = self.build_dir()
            os.makedirs(directory, exist_ok=True)
            self._lock_fd = try_lock(os.path.join(directory, LOCK))
            if self._lock_fd is None:
                return "wait"
            if self.is_built():  # finished by another process between the look and the lock
                os.close(self._lock_fd)
                self._lock_fd = None
                return "cached"
            return "build"
        except Exception:  # noqa: BLE001 -- unreadable sources and the like: the run reports them
            return "unknown"

    def run(self, progress: Progress | None = None) -> None:
        """Build or load the module (after :meth:`claim`, and :meth:`reserve` if the caller announced the build:
        ``progress`` is then the batch it belongs to). Never raises: an extension that cannot be had is None and
        the reason is logged."""
        try:
            if self.wanted():
                self._module = self._load(progress)
        except Exception as e:  # noqa: BLE001 -- no compiler, headers or symbols: the torch paths still work
            log.warning("C++ extension %s (%s) unavailable (%s); using the torch paths", self.name, self.what, e)
        finally:
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None
            self._done.set()

    def _load(self, progress: Progress | None) -> ModuleType:
        directory = self.build_dir()
        if self._lock_fd is None:
            module = _import_build(directory)
            if module is not None:
                log.debug("loaded %s from %s", self.name, directory)
                return module
            os.makedirs(directory, exist_ok=True)
            self._lock_fd = try_lock(os.path.join(directory, LOCK))
            if self._lock_fd is None:
                if self._plan != "wait":  # else the batch said so
                    log.info("waiting for another process's build of %s in %s", self.name, directory)
                self._lock_fd = lock(os.path.join(directory, LOCK))
        module = _import_build(directory)  # again, with the lock held: another process may have built it meanwhile
        if module is not None:
            log.info("loaded %s, built by another process", self.name)
            return module
        if progress is None:
            log.info("building %s (%s) in %s", self.name, self.what, directory)
        start = time.monotonic()
        module = self._compile(directory)
        seconds = time.monotonic() - start
        _write_atomically(os.path.join(directory, MARKER), json.dumps({
            "module": module.__name__, "library": os.path.basename(module.__file__), "seconds": round(seconds, 1),
            "digest": self.key().digest, "key": self.key().material}, indent=1).encode())
        log.info("built %s in %.1f s%s", self.name, seconds, progress.step() if progress else "")
        return module

    def _compile(self, directory: str) -> ModuleType:
        """Build with torch's JIT loader from a copy of the sources inside ``directory`` (its lock held)."""
        from torch.utils.cpp_extension import load

        src = os.path.join(directory, "src")
        os.makedirs(src, exist_ok=True)
        for f, data in self.source_bytes().items():
            _write_atomically(os.path.join(src, f), data)
        baton = os.path.join(directory, "lock")
        if os.path.exists(baton):  # torch's own lock: with ours held, one left here is from a killed build
            os.remove(baton)
        return load(name=f"aspen_{self.name}_{self.key().short}",
                    sources=[os.path.join(src, f) for f in self.sources if f.endswith(_COMPILED)],
                    extra_cflags=list(self.cflags), extra_ldflags=list(self.ldflags), build_directory=directory,
                    verbose=False)


def _import_build(directory: str) -> ModuleType | None:
    """The module of the complete build in ``directory``, or None where there is none."""
    try:
        with open(os.path.join(directory, MARKER)) as f:
            built = json.load(f)
        module_name, library = built["module"], os.path.join(directory, built["library"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    import torch  # noqa: F401 -- the library links against torch's, which importing torch loads

    try:
        spec = importlib.util.spec_from_file_location(module_name, library)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except (ImportError, OSError) as e:
        raise RuntimeError(f"the build in {directory} does not load ({e}); delete that directory to rebuild "
                           "it") from e
    return module


def _write_atomically(path: str, data: bytes) -> None:
    """``path`` holds ``data`` (left untouched when it already does: its time stamp is what ninja compares)."""
    try:
        with open(path, "rb") as f:
            if f.read() == data:
                return
    except OSError:
        pass
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
