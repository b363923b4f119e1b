"""Converted copies of GGUF files: ``$ASPEN_HOME/gguf/<digest>-<dtype>/``, one Hugging Face checkpoint directory
per file content and dtype (``ASPEN_HOME`` defaults to ``~/.cache/aspen``, as for the project's other caches).

The digest is the SHA-256 of the file's bytes (its first 16 hex digits name the directory): copies of one file
share one conversion, and a changed file gets a conversion of its own. Hashing reads the file once; the digest is
remembered under ``digests/`` with the file's path, size, modification time and inode, so a later start reads
nothing while those stay the same.

A conversion runs under an exclusive ``flock`` on ``<directory>.lock`` (the system drops it when the process ends,
however it ends) into a temporary sibling directory, renamed into place once complete: concurrent starts wait for
one conversion instead of racing, and an interrupted one leaves nothing under the directory's name.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time

import torch
from tqdm import tqdm

from aspen.files import aspen_home, lock, try_lock
from aspen.model.gguf import CONFIG_FILE, WEIGHTS_FILE, GGUFHeader, convert

log = logging.getLogger("aspen.model")

#: Part of every conversion's record; changed when the conversion changes, so that older copies are redone.
RECIPE = 1
RECORD_FILE = "gguf-conversion.json"
#: Files from this size on are hashed with a progress bar.
HASH_BAR_BYTES = 256 << 20


def cache_root() -> str:
    """The folder that holds the converted copies and the remembered digests."""
    return os.path.join(aspen_home(), "gguf")


def file_digest(path: str, progress: bool = True) -> str:
    """SHA-256 (hex) of the file's bytes; remembered while the file's path, size, mtime and inode stay the same."""
    real = os.path.realpath(path)
    st = os.stat(real)
    stamp = {"path": real, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}
    memo = os.path.join(cache_root(), "digests", hashlib.sha256(real.encode()).hexdigest()[:16] + ".json")
    try:
        with open(memo, encoding="utf-8") as f:
            known = json.load(f)
        if known["stamp"] == stamp:
            return known["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    h = hashlib.sha256()
    with open(real, "rb") as f, tqdm(total=st.st_size, unit="B", unit_scale=True, desc=f"hashing {os.path.basename(real)}",
                                     disable=not progress or st.st_size < HASH_BAR_BYTES) as bar:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            bar.update(len(chunk))
    digest = h.hexdigest()
    try:
        _write_json(memo, {"stamp": stamp, "sha256": digest})
    except OSError as e:  # a read-only cache still serves the conversions it holds
        log.warning("could not remember the digest of %s in %s (%s)", real, memo, e)
    return digest


class GGUFCheckpoint:
    """The converted checkpoint directory of one GGUF file in one dtype.

    :meth:`check` refuses an unsupported file (before any work is started on its behalf); :meth:`materialize`
    converts it unless the cache holds it already and returns the directory."""

    def __init__(self, path: str, dtype: torch.dtype, progress: bool = True) -> None:
        self.source = os.path.abspath(path)
        self.dtype = dtype
        self.progress = progress
        self.digest = file_digest(self.source, progress)
        dtype_name = str(dtype).rsplit(".", 1)[-1]
        self.directory = os.path.join(cache_root(), f"{self.digest[:16]}-{dtype_name}")
        self._header: GGUFHeader | None = None

    def cached(self) -> bool:
        """True when the directory holds a complete conversion of this file's content by this recipe."""
        try:
            with open(os.path.join(self.directory, RECORD_FILE), encoding="utf-8") as f:
                record = json.load(f)
        except (OSError, ValueError):
            return False
        return (isinstance(record, dict) and record.get("recipe") == RECIPE and record.get("sha256") == self.digest
                and all(os.path.isfile(os.path.join(self.directory, n)) for n in (CONFIG_FILE, WEIGHTS_FILE)))

    def check(self) -> None:
        """Raise :class:`~aspen.errors.CheckpointError` naming what the file has that we do not run (nothing to
        check when the cache holds its conversion)."""
        if self._header is None and not self.cached():
            header = GGUFHeader.read(self.source)
            header.check_supported()
            self._header = header

    def materialize(self) -> str:
        """The converted checkpoint directory, converting the file first unless the cache holds it."""
        if self.cached():
            log.info("loading %s from its converted copy in %s", os.path.basename(self.source), self.directory)
            return self.directory
        root = os.path.dirname(self.directory)
        os.makedirs(root, exist_ok=True)
        fd = try_lock(self.directory + ".lock")
        if fd is None:
            log.info("waiting for another process's conversion of %s into %s", self.source, self.directory)
            fd = lock(self.directory + ".lock")
        try:
            if self.cached():  # converted by the process we waited for
                return self.directory
            self._convert_locked(root)
        finally:
            os.close(fd)  # releases the flock
        return self.directory

    def _convert_locked(self, root: str) -> None:
        self.check()
        assert self._header is not None
        name = os.path.basename(self.directory)
        for stale in os.listdir(root):  # left by a process that died mid-conversion (the lock is ours)
            if stale.startswith(f".{name}."):
                shutil.rmtree(os.path.join(root, stale), ignore_errors=True)
        log.info("converting GGUF %s (%s) to a %s checkpoint in %s (once; later starts reuse it)", self.source,
                 self._header.describe(), str(self.dtype).rsplit(".", 1)[-1], self.directory)
        start = time.monotonic()
        tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root)
        try:
            record = convert(self._header, tmp, self.dtype, self.progress)
            _write_json(os.path.join(tmp, RECORD_FILE), {**record, "sha256": self.digest, "recipe": RECIPE})
            os.chmod(tmp, 0o755)  # a checkpoint directory like any other (mkdtemp makes it private)
            if os.path.lexists(self.directory):  # incomplete or from another recipe: move aside, then delete
                old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=root)
                os.rename(self.directory, os.path.join(old, name))
                shutil.rmtree(old, ignore_errors=True)
            os.rename(tmp, self.directory)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone already after the rename
        log.info("converted %s in %.1f s into %s", os.path.basename(self.source), time.monotonic() - start,
                 self.directory)


def _write_json(path: str, data: dict) -> None:
    """Write ``data`` to ``path`` through a temporary file renamed over it, so that no reader sees half of it."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
