"""ASPEN serve engine: scheduling, continuous batching, KV blocks, adapter cache, gRPC server.

The bookkeeping modules (scheduler, block manager, adapter cache) import no torch; the public names below load
lazily so importing them stays cheap.
"""
from __future__ import annotations

from typing import Any

__all__ = ["AsyncLLMEngine", "EngineConfig", "LLMEngine", "RequestOutput", "ResponseFormat", "SamplingParams"]

_LAZY = {
    "LLMEngine": "engine.llm_engine",
    "AsyncLLMEngine": "engine.async_engine",
    "SamplingParams": "engine.scheduling.sampling_params",
    "EngineConfig": "engine.config",
    "RequestOutput": "engine.outputs",
    "ResponseFormat": "engine.scheduling.response_format",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
