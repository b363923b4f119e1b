"""One generation request as the scheduler tracks it (pure Python, no torch).

Token accounting. ``all_token_ids`` is the prompt followed by the sampled tokens.
``num_computed_tokens`` counts the leading tokens of ``all_token_ids`` whose KV is in the KV
cache. A request *needs prefill* while ``num_computed_tokens < num_tokens - 1``; in *decode* it
has exactly one uncomputed token, the last one sampled (or the last prompt token), which the next
step feeds to the model to sample the next token. Preemption (recompute) resets
``num_computed_tokens`` to 0 but keeps ``output_token_ids``, so the request re-prefills
``all_token_ids`` and continues where it stopped.

Lifecycle: ``WAITING`` (queued, holds no KV blocks and no adapter pin) -> ``RUNNING`` (holds
both) -> ``FINISHED`` (holds neither; ``finish_reason`` set). Preemption moves a request from
``RUNNING`` back to ``WAITING``. Only :class:`engine.scheduling.scheduler.Scheduler` changes ``status``.
"""
from __future__ import annotations

import enum
from collections.abc import Hashable, Sequence

from engine.scheduling.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    LENGTH = "length"  # max_new_tokens reached
    STOP = "stop"  # a stop string or a stop token id
    EOS = "eos"  # an EOS token (not ignored)
    ABORTED = "aborted"  # cancelled by the client or the server
    ERROR = "error"  # failed, ``Request.error`` says why


class Request:
    """Mutable per-request state. The scheduler owns every field except ``output_token_ids``'s
    contents, which it appends to in :meth:`Scheduler.on_step_done`.

    ``adapter_id`` None means the base model. ``adapter_key`` is the prefix-cache key of the
    adapter weights this request runs with: None for the base model, else ``(adapter_id,
    generation)``, set at each admission from the adapter cache's ``AcquireResult.generation``.
    ``adapter_handle`` is the device copy of the adapter that admission pinned (opaque to the
    scheduler), set while ``RUNNING`` and cleared when the pin is released (preemption, finish).
    ``num_cached_tokens`` is the prefix-cache hit (in tokens) at its first admission.
    ``skipped`` counts the requests admitted past this one while it waited at the head of the
    queue for its adapter (see the fairness rule in :mod:`engine.scheduling.scheduler`).
    """

    __slots__ = (
        "adapter_handle",
        "adapter_id",
        "adapter_key",
        "arrival_time",
        "error",
        "finish_reason",
        "finished_time",
        "first_scheduled_time",
        "first_token_time",
        "num_cached_tokens",
        "num_computed_tokens",
        "num_preemptions",
        "output_token_ids",
        "params",
        "prompt_token_ids",
        "request_id",
        "skipped",
        "status",
    )

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams | None = None,
        adapter_id: str | None = None,
        arrival_time: float | None = None,
    ) -> None:
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id must be a non-empty str, got {request_id!r}")
        if adapter_id is not None and (not isinstance(adapter_id, str) or not adapter_id):
            raise ValueError(f"adapter_id must be None or a non-empty str, got {adapter_id!r}")
        prompt = list(prompt_token_ids)
        if not prompt:
            raise ValueError(f"request {request_id!r}: prompt_token_ids must be non-empty")
        for tid in prompt:
            if isinstance(tid, bool) or not isinstance(tid, int) or tid < 0:
                raise ValueError(f"request {request_id!r}: token ids must be ints >= 0, got {tid!r}")
        self.request_id = request_id
        self.prompt_token_ids: list[int] = prompt
        self.params = params if params is not None else SamplingParams()
        self.adapter_id = adapter_id
        self.arrival_time = arrival_time  # set by Scheduler.add when None
        self.output_token_ids: list[int] = []
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0
        self.adapter_key: Hashable = None
        self.adapter_handle: object = None
        self.finish_reason: FinishReason | None = None
        self.error: BaseException | None = None
        self.num_preemptions = 0
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.finished_time: float | None = None
        self.skipped = 0

    # ------------------------------------------------------------------ tokens
    @property
    def all_token_ids(self) -> list[int]:
        """Prompt followed by the output tokens (a new list)."""
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_prefill(self) -> bool:
        """True while more than the last known token still lacks KV (see the module docstring)."""
        return self.num_computed_tokens < self.num_tokens - 1

    @property
    def reached_max_new_tokens(self) -> bool:
        return len(self.output_token_ids) >= self.params.max_new_tokens

    # ------------------------------------------------------------------ status
    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, adapter={self.adapter_id!r}, status={self.status.name}, "
            f"prompt={self.num_prompt_tokens}, output={self.num_output_tokens}, "
            f"computed={self.num_computed_tokens}, finish_reason={self.finish_reason})"
        )
