"""Exceptions of the model library. Each names what is wrong and what was expected."""
from __future__ import annotations


class AspenError(Exception):
    """Base class of every error the model library raises on bad input."""


class CheckpointError(AspenError):
    """A base-model checkpoint directory is missing, malformed or unsupported."""


class AdapterError(AspenError):
    """A LoRA adapter is malformed, unsupported, or does not fit the base model."""


class AdapterNotFoundError(AdapterError):
    """No adapter exists under the given id or path."""


class AdapterPathError(AdapterError):
    """An adapter id or path is malformed or escapes the adapter root."""
