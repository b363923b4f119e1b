"""ASPEN model library: Llama-family decoders over a paged KV cache, the multi-LoRA op, quantized base loading,
PEFT adapter IO and training mode.

Heavy modules (torch, transformers) load on first use, so ``import aspen`` stays cheap for tools that only need
configs or the demo assets.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aspen.errors import AdapterError, AspenError, CheckpointError

if TYPE_CHECKING:
    from aspen.language_model import LanguageModel

__all__ = ["AdapterError", "AspenError", "CheckpointError", "LanguageModel", "load_model"]
__version__ = "0.1.0"  # the one place the version lives: setup.cfg, `aspen --version` and the server read it


def load_model(path: str, dtype: str = "float32", quantize: str | None = None, device: str = "cpu",
               progress: bool = True) -> LanguageModel:
    """Load a local Hugging Face checkpoint directory or GGUF file; see :func:`aspen.language_model.load_model`."""
    from aspen.language_model import load_model as _load

    return _load(path, dtype=dtype, quantize=quantize, device=device, progress=progress)


def __getattr__(name: str) -> Any:
    if name == "LanguageModel":
        from aspen.language_model import LanguageModel

        return LanguageModel
    raise AttributeError(name)
