"""Engine-side state of one request: its detokenizer, sampling state (with its grammar matcher when the request has
a response format), logprobs, and what was already reported."""
from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from engine.detokenizer import IncrementalDetokenizer
from engine.outputs import RequestOutput, TokenLogprob
from engine.sampler import SampleResult, SamplingState
from engine.scheduling.request import FinishReason, Request
from engine.structured.matcher import GrammarMatcher


class RequestState:
    def __init__(self, request: Request, tokenizer, device: torch.device,
                 matcher: GrammarMatcher | None = None, end_of_turn_ids: Sequence[int] = ()) -> None:
        """``end_of_turn_ids``: tokens that end this request like an EOS token (a chat template's end of turn)."""
        self.request = request
        p = request.params
        self.detok = IncrementalDetokenizer(tokenizer, request.prompt_token_ids, p.skip_special_tokens, p.stop)
        # shares the request's output list: the scheduler appends each sampled token to it
        self.end_of_turn_ids = tuple(end_of_turn_ids)
        self.sampling = SamplingState(p, request.prompt_token_ids, request.output_token_ids, matcher=matcher,
                                      end_of_turn_ids=self.end_of_turn_ids)
        self.logprobs: list[TokenLogprob] = []
        self.stop_reason: str | int | None = None
        self._delta_text = ""
        self._reported_tokens = 0
        self._reported_logprobs = 0

    def on_token(self, result: SampleResult, row: int, eos_token_ids: Sequence[int], max_model_len: int,
                 now: float) -> FinishReason | None:
        """Record the token the step sampled for this request (already appended by the scheduler); return why
        the request is finished, or None.

        Raises :class:`~engine.scheduling.response_format.ResponseFormatError` when the token does not continue
        the request's format (its grammar could not be followed); the engine then fails this request alone."""
        req, p = self.request, self.request.params
        token = result.token_ids[row]
        matcher = self.sampling.matcher
        if matcher is not None:
            matcher.sync(req.output_token_ids)
        if req.first_token_time is None:
            req.first_token_time = now
        if p.logprobs is not None:
            top = tuple(result.top_logprobs[row] or ())
            self.logprobs.append(TokenLogprob(token, float(result.logprobs[row]), top))
        self._delta_text += self.detok.add(token)
        n = req.num_output_tokens
        reason = None
        if n >= p.min_new_tokens and token in p.stop_token_ids:
            reason, self.stop_reason = FinishReason.STOP, token
        elif n >= p.min_new_tokens and not p.ignore_eos and (token in eos_token_ids
                                                             or token in self.end_of_turn_ids):
            reason = FinishReason.EOS
        elif self.detok.stopped:
            reason, self.stop_reason = FinishReason.STOP, self.detok.stop_reason
        elif matcher is not None and matcher.is_complete:  # the format allows nothing more
            reason = FinishReason.STOP
        elif n >= p.max_new_tokens or req.num_tokens >= max_model_len:
            reason = FinishReason.LENGTH
        if reason is not None:
            self._delta_text += self.detok.finish()
            req.finished_time = now
        return reason

    def output(self, error: BaseException | None = None) -> RequestOutput:
        """The request's output now, with the delta since the previous call."""
        req = self.request
        if error is not None:
            with contextlib.suppress(Exception):  # the detokenizer may be what failed: report the error regardless
                self._delta_text += self.detok.finish()
        tokens = tuple(req.output_token_ids)
        delta_tokens = tokens[self._reported_tokens:]
        delta_lp = tuple(self.logprobs[self._reported_logprobs:])
        self._reported_tokens, self._reported_logprobs = len(tokens), len(self.logprobs)
        delta_text, self._delta_text = self._delta_text, ""
        reason = FinishReason.ERROR if error is not None else req.finish_reason
        metrics = {k: v for k, v in (("arrival", req.arrival_time), ("first_scheduled", req.first_scheduled_time),
                                     ("first_token", req.first_token_time), ("finished", req.finished_time))
                   if v is not None}
        return RequestOutput(
            request_id=req.request_id, adapter_id=req.adapter_id, prompt_token_ids=tuple(req.prompt_token_ids),
            text=self.detok.text, token_ids=tokens, delta_text=delta_text, delta_token_ids=delta_tokens,
            finish_reason=reason.value if reason is not None else None, stop_reason=self.stop_reason,
            logprobs=tuple(self.logprobs), delta_logprobs=delta_lp, num_cached_tokens=req.num_cached_tokens,
            error=f"{type(error).__name__}: {error}" if error is not None else None, metrics=metrics)
