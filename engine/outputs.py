"""What the engine hands back for a request: the text so far, the newest delta, and how it ended."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob) of the top-n alternatives


@dataclass(frozen=True)
class RequestOutput:
    request_id: str
    adapter_id: str | None
    prompt_token_ids: tuple[int, ...]
    text: str  # the whole output text so far (stop string excluded)
    token_ids: tuple[int, ...]  # every generated token so far
    delta_text: str  # new text since the previous output of this request
    delta_token_ids: tuple[int, ...]
    finish_reason: str | None = None  # "length" | "stop" | "eos" | "aborted" | "error" once finished
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    logprobs: tuple[TokenLogprob, ...] = ()  # per generated token, when requested
    delta_logprobs: tuple[TokenLogprob, ...] = ()
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    error: str | None = None  # set when finish_reason == "error"
    metrics: dict[str, float] = field(default_factory=dict)  # arrival, first_token, finished (monotonic s)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)
