"""What each benchmark needs beyond the core install, and the one-line refusal when it is missing.

A benchmark that compares with a peer library (PEFT) needs that library, which the ``[bench]`` extra installs.
The check only looks the modules up (``importlib.util.find_spec``), so it answers before any model is built or
any heavy module is imported.
"""
from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable

from aspen.errors import AspenError

DISTRIBUTION = "aspen-serve"
#: extra -> the importable modules it provides
EXTRAS: dict[str, tuple[str, ...]] = {"bench": ("peft",)}
#: benchmark -> the extra it needs
NEEDS: dict[str, str] = {"vs_peft": "bench", "train_fused": "bench"}


class MissingExtra(AspenError):
    """A benchmark's optional dependency is not installed; the message names the extra that installs it."""


def missing(benchmark: str) -> str | None:
    """None when ``benchmark`` can run here, else one line naming the missing modules and the extra."""
    extra = NEEDS.get(benchmark)
    if extra is None:
        return None
    absent = [m for m in EXTRAS[extra] if importlib.util.find_spec(m) is None]
    if not absent:
        return None
    return (f"{benchmark} needs {', '.join(absent)}, which is not installed: "
            f"pip install '{DISTRIBUTION}[{extra}]'")


def require(benchmark: str) -> None:
    """Raise :class:`MissingExtra` when ``benchmark``'s extra is not installed."""
    message = missing(benchmark)
    if message is not None:
        raise MissingExtra(message)


def run_as_script(benchmark: str, main: Callable[[], object]) -> None:
    """``python -m benchmarks.NAME``: refuse in one line when the extra is missing, else run ``main``."""
    message = missing(benchmark)
    if message is not None:
        sys.exit(f"benchmarks.{benchmark}: {message}")
    main()
