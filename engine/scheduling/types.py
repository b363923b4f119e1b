"""The scheduler's interface types (pure Python, no torch): its config, what one step returns (the chunks,
:class:`SchedulerOutput`), its counters, the adapter-pin protocol it needs and the error of a full queue.

:class:`engine.scheduling.scheduler.Scheduler` uses them; :mod:`engine.scheduling.scheduler` re-exports them all.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Protocol

from engine.scheduling.request import Request


class QueueFullError(RuntimeError):
    """A request was refused because ``max_waiting`` requests already wait (the engine owns the cap: it counts
    the adds not yet applied too)."""

    def __init__(self, max_waiting: int) -> None:
        self.max_waiting = max_waiting
        super().__init__(f"the waiting queue is full ({max_waiting} requests); retry later")


@dataclass(frozen=True)
class SchedulerConfig:
    """What the scheduler needs to know; the engine derives it from its own config
    (``EngineConfig.scheduler_config``), whose fields of the same names it mirrors."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 4096
    chunked_prefill: bool = True  # False: a prompt is prefilled whole in one step
    max_head_skips: int = 32  # fairness bound, see the engine.scheduling.scheduler docstring

    def __post_init__(self) -> None:
        minimum = {"max_num_seqs": 1, "max_num_batched_tokens": 1, "max_model_len": 1, "max_head_skips": 0}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "chunked_prefill":
                if not isinstance(value, bool):
                    raise ValueError(f"chunked_prefill must be a bool, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int) or value < minimum[f.name]:
                raise ValueError(f"{f.name} must be an int >= {minimum[f.name]}, got {value!r}")


@dataclass(frozen=True)
class ScheduledChunk:
    """Compute KV for ``request.all_token_ids[start:end]`` in this step.

    ``sample``: the chunk reaches the last known token, so the step samples a new token for it.
    ``block_table``: the request's KV blocks, covering at least ``end`` tokens.
    ``adapter_handle``: the device copy of the request's adapter that admission pinned (opaque here; stable
    while pinned), None for the base model. The runner reads the weights through it, with no second lookup.
    """

    request: Request
    start: int
    end: int
    sample: bool
    block_table: tuple[int, ...]
    adapter_handle: object = None

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class SchedulerOutput:
    chunks: tuple[ScheduledChunk, ...]
    preempted: tuple[Request, ...]  # moved back to the waiting queue in this step
    failed: tuple[Request, ...]  # finished with FinishReason.ERROR at admission, ``.error`` set
    num_batched_tokens: int


@dataclass(frozen=True)
class SchedulerStats:
    num_steps: int  # schedule() calls that scheduled at least one chunk
    num_preemptions: int
    num_prefix_cached_tokens: int  # prefix-cache hits over all admissions, resumed ones included
    num_failed: int
    num_adapter_waits: int = 0  # admissions refused for adapter pages (CACHE_FULL), one per request and step
    num_kv_waits: int = 0  # admissions refused for KV blocks, one per step at most (admission stops there)


class AdapterPin(Protocol):
    """The answer to one acquire (``engine.adapters.types.AcquireResult`` satisfies it)."""

    @property
    def ok(self) -> bool: ...  # False: not now (pages held by pinned adapters), nothing pinned
    @property
    def generation(self) -> int: ...  # of the weights the id names now: part of the prefix-cache key
    @property
    def handle(self) -> object: ...  # the pinned device copy, handed to the runner unopened


class AdapterPins(Protocol):
    """What the scheduler needs from the adapter cache (``engine.adapters.cache.AdapterCache`` satisfies it)."""

    def acquire(self, adapter_id: str) -> AdapterPin: ...
    def release(self, adapter_id: str) -> None: ...
    def can_acquire(self, adapter_id: str) -> bool: ...
