"""Adapter ids and where they live on disk (stdlib only).

Contract
--------
* An adapter id is a *relative* sub-path of the adapter root, e.g. ``"math"`` or
  ``"team-a/summarizer-v2"``: 1..256 characters from ``[A-Za-z0-9._-]`` plus ``/`` as the
  component separator. No empty, ``.`` or ``..`` components, no leading ``/``, no backslashes,
  no NUL or other control characters. :func:`validate_adapter_id` checks this syntax only, and
  :func:`validate_adapter_path` the same syntax of a directory given for an adapter; the adapter
  cache is their one caller, where an id or a path enters it.
* :func:`resolve_adapter_path` resolves a well-formed id (or path) against the root with
  ``os.path.realpath`` and refuses anything that lands outside ``realpath(root)`` (or on the
  root itself), so a symlink inside the root may point elsewhere *inside* the root but never out
  of it. A missing directory is :class:`AdapterNotFoundError`; every other refusal is
  :class:`AdapterPathError`. Both name the problem and the offending id.
* :func:`list_adapter_dirs` lists, sorted, the ids of every directory under the root that holds
  an ``adapter_config.json``. It follows symlinks that stay inside the root (so an alias such as
  ``latest -> v2`` is listed under both names), skips those that escape, breaks symlink cycles,
  and skips names that are not valid ids.

Confinement is checked at resolve time, and again by :func:`check_confined` right before the adapter cache reads an
adapter (a directory swapped for a symlink after it was registered, or a *file* inside the adapter directory
that is a symlink out of the root, is refused then). What remains is the window between that check and the
open (TOCTOU), which needs an attacker who can already write inside the adapter root.
"""
from __future__ import annotations

import os
import re
import unicodedata

from aspen.errors import AdapterNotFoundError, AdapterPathError

MAX_ADAPTER_ID_LEN = 256
ADAPTER_CONFIG_NAME = "adapter_config.json"
#: The files a PEFT adapter loader opens inside an adapter directory (aspen.lora.peft.reader).
ADAPTER_FILE_NAMES = (ADAPTER_CONFIG_NAME, "adapter_model.safetensors", "adapter_model.bin")
_DISALLOWED = re.compile(r"[^A-Za-z0-9._\-/]")


def _show(adapter_id: str) -> str:
    """A short, printable rendering of an id for error messages."""
    text = repr(adapter_id)
    return text if len(text) <= 80 else text[:77] + "..."


def validate_adapter_id(adapter_id: str) -> None:
    """Raise :class:`AdapterPathError` unless ``adapter_id`` is a well-formed relative adapter id. The adapter
    cache calls it at the one gate every id passes on its way in (``AdapterCache._entry``)."""
    problem = _syntax_problem(adapter_id, "adapter id")
    if problem is not None:
        raise AdapterPathError(problem)


def validate_adapter_path(path: str) -> None:
    """Raise :class:`AdapterPathError` unless ``path`` (a directory given for an adapter, relative to the root)
    has an adapter id's syntax."""
    problem = _syntax_problem(path, "adapter path")
    if problem is not None:
        raise AdapterPathError(problem)


def _syntax_problem(name: object, noun: str) -> str | None:
    """Why ``name`` is not a well-formed relative path of the adapter root (see the module contract), or None."""
    if not isinstance(name, str):
        return f"{noun} must be a string, got {type(name).__name__}"
    if not name:
        return f"{noun} is empty; expected a relative path such as 'team-a/summarizer'"
    if len(name) > MAX_ADAPTER_ID_LEN:
        return f"{noun} {_show(name)} is {len(name)} characters long; at most {MAX_ADAPTER_ID_LEN} are allowed"
    if "\x00" in name:
        return f"{noun} {_show(name)} contains a NUL character"
    controls = sorted({c for c in name if unicodedata.category(c) == "Cc"})
    if controls:
        shown = ", ".join(f"U+{ord(c):04X}" for c in controls)
        return f"{noun} {_show(name)} contains control characters ({shown})"
    if "\\" in name:
        return f"{noun} {_show(name)} contains a backslash; use '/' between components"
    if name.startswith("/"):
        return f"{noun} {_show(name)} is an absolute path; expected a path relative to the adapter root"
    for component in name.split("/"):
        if component == "":
            return f"{noun} {_show(name)} has an empty path component ('//' or a trailing '/')"
        if component in (".", ".."):
            return f"{noun} {_show(name)} has a {component!r} path component"
    bad = sorted(set(_DISALLOWED.findall(name)))
    if bad:
        return f"{noun} {_show(name)} has characters outside [A-Za-z0-9._-/]: " + ", ".join(repr(c) for c in bad)
    return None


def _is_inside(path: str, root: str) -> bool:
    """True when real path ``path`` lies strictly below real path ``root``."""
    return path != root and os.path.commonpath([path, root]) == root


def resolve_adapter_path(root: str, adapter_id: str) -> str:
    """Return the real path of adapter ``adapter_id`` (or of a path given for one) under ``root``; its syntax is
    checked already (:func:`validate_adapter_id`, :func:`validate_adapter_path`).

    Raises :class:`AdapterPathError` when it resolves outside the root (or onto the root itself),
    :class:`AdapterNotFoundError` when the root or the adapter directory does not exist.
    """
    root_real = os.path.realpath(root)
    if not os.path.isdir(root_real):
        raise AdapterNotFoundError(f"adapter root {root!r} is not a directory")
    real = os.path.realpath(os.path.join(root_real, adapter_id))
    if real == root_real:
        raise AdapterPathError(f"adapter id {_show(adapter_id)} resolves to the adapter root itself")
    if not _is_inside(real, root_real):
        raise AdapterPathError(
            f"adapter id {_show(adapter_id)} resolves outside the adapter root"  # no paths: clients read this
        )
    if not os.path.isdir(real):
        raise AdapterNotFoundError(f"no adapter directory {_show(adapter_id)} under {root_real!r}")
    return real


def check_confined(root: str, path: str) -> None:
    """Raise :class:`AdapterPathError` unless the adapter directory ``path`` and the adapter files in it (those
    that exist) still resolve strictly inside ``root``. Called right before an adapter is read."""
    root_real = os.path.realpath(root)
    real = os.path.realpath(path)
    if not _is_inside(real, root_real):
        raise AdapterPathError(f"adapter directory {_show(os.path.basename(path))} now resolves outside the "
                               "adapter root (replaced by a symlink?)")
    for name in ADAPTER_FILE_NAMES:
        file = os.path.join(real, name)
        if os.path.lexists(file) and not _is_inside(os.path.realpath(file), root_real):
            raise AdapterPathError(f"{name} of adapter directory {_show(os.path.relpath(real, root_real))} is a "
                                   "symlink that leads outside the adapter root")


def list_adapter_dirs(root: str) -> list[str]:
    """Ids of every directory under ``root`` that contains ``adapter_config.json``, sorted."""
    root_real = os.path.realpath(root)
    if not os.path.isdir(root_real):
        raise AdapterNotFoundError(f"adapter root {root!r} is not a directory")
    found: list[str] = []
    # (id so far, real directory, real paths of it and its ancestors: a symlink back to one of
    # them would be a cycle).
    stack: list[tuple[str, str, frozenset[str]]] = [("", root_real, frozenset({root_real}))]
    while stack:
        rel, real_dir, ancestors = stack.pop()
        try:
            with os.scandir(real_dir) as it:
                entries = list(it)
        except OSError:
            continue
        for entry in entries:
            child_id = f"{rel}/{entry.name}" if rel else entry.name
            if _syntax_problem(child_id, "adapter id") is not None:
                continue
            try:
                if not entry.is_dir(follow_symlinks=True):
                    continue
            except OSError:
                continue
            child_real = os.path.realpath(entry.path)
            if not _is_inside(child_real, root_real) or child_real in ancestors:
                continue
            if os.path.isfile(os.path.join(child_real, ADAPTER_CONFIG_NAME)):
                found.append(child_id)
            stack.append((child_id, child_real, ancestors | {child_real}))
    return sorted(found)
