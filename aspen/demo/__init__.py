"""The embedded demo base model: a tiny Llama checkpoint bundled with the package (see ``assets/README.md``).

:func:`ensure_demo_base` materialises it as an ordinary Hugging Face checkpoint directory, so every code path
that loads a model from disk can be exercised with no download. Importing this module is cheap (no torch).
"""
from __future__ import annotations

import filecmp
import os
import shutil
import tempfile

from aspen.files import aspen_home

ASSETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")

# Files a usable checkpoint must have; everything else in ASSETS_DIR is copied too.
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

DEMO_PROMPTS = (
    "Once upon a time",
    "The little dog",
    "One day, Lily went to the park.",
    "Question: what is two plus three?\nAnswer:",
    "Instruction: say hello to Tom.\nResponse:",
)

__all__ = ["ASSETS_DIR", "DEMO_PROMPTS", "REQUIRED_FILES", "default_home", "ensure_demo_base"]


def default_home() -> str:
    """``$ASPEN_HOME`` if set, else ``~/.cache/aspen`` (:func:`aspen.files.aspen_home`)."""
    return aspen_home()


def _asset_files() -> list[str]:
    names = sorted(f for f in os.listdir(ASSETS_DIR) if os.path.isfile(os.path.join(ASSETS_DIR, f)))
    missing = [f for f in REQUIRED_FILES if f not in names]
    if missing:
        raise FileNotFoundError(f"demo assets in {ASSETS_DIR} are missing {missing}; "
                                "rebuild them with `python -m aspen.demo.build`")
    return names


def _complete(out_dir: str, names: list[str]) -> bool:
    """True when ``out_dir`` holds every bundled file with the same size and content."""
    for name in names:
        dst = os.path.join(out_dir, name)
        src = os.path.join(ASSETS_DIR, name)
        if not os.path.isfile(dst) or os.path.getsize(dst) != os.path.getsize(src):
            return False
        if not filecmp.cmp(src, dst, shallow=True):
            return False
    return True


def ensure_demo_base(out_dir: str | None = None) -> str:
    """Write the bundled checkpoint to ``out_dir`` (default ``default_home()/demo/base``) unless already there.

    The copy goes to a temporary sibling directory that is renamed into place, so an interrupted copy never
    leaves a half-written checkpoint at ``out_dir``. Idempotent; returns the absolute path.
    """
    out_dir = os.path.abspath(out_dir or os.path.join(default_home(), "demo", "base"))
    names = _asset_files()
    if _complete(out_dir, names):
        return out_dir
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        for name in names:
            shutil.copyfile(os.path.join(ASSETS_DIR, name), os.path.join(tmp, name))
        if os.path.lexists(out_dir):
            # Incomplete or stale: move it aside first (rename is atomic), then delete it.
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
            os.rename(out_dir, os.path.join(old, "x"))
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not _complete(out_dir, names):  # lost a race to a concurrent writer that did not finish
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
