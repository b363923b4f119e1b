"""``aspen adapters list|load|unload``: manage adapters on a running server (see :mod:`clients.cli`)."""
from __future__ import annotations

from clients.cli import add_adapters_arguments as add_arguments
from clients.cli import run_adapters as run

__all__ = ["add_arguments", "run"]
