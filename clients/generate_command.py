"""``aspen generate``: stream a completion from a running server to the terminal (see :mod:`clients.cli`)."""
from __future__ import annotations

from clients.cli import add_generate_arguments as add_arguments
from clients.cli import run_generate as run

__all__ = ["add_arguments", "run"]
