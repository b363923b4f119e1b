"""Engine outputs -> OpenAI response bodies: whole completions and chat completions, their streamed chunks (as
Server-Sent Events ``data:`` lines), usage and log-probabilities.

A :class:`Renderer` knows one endpoint's shapes; :mod:`engine.http.generation` drives it with the outputs of the
request's choices. Finish reasons: the engine's ``length`` is OpenAI's ``length``; ``stop`` (a stop string or
stop token id, reported in ``stop_reason`` as vLLM does) and ``eos`` are ``stop``.
"""
from __future__ import annotations

import functools
import time
import uuid
from collections.abc import Sequence

from engine.http import responses as r
from engine.outputs import RequestOutput
from engine.outputs import TokenLogprob as EngineLogprob

DONE = "data: [DONE]\n\n"
_FINISH = {"length": "length", "stop": "stop", "eos": "stop"}


def sse(body) -> str:
    """One Server-Sent Event carrying a JSON body."""
    return f"data: {body.model_dump_json()}\n\n"


def finish_reason(out: RequestOutput) -> str | None:
    return _FINISH.get(out.finish_reason) if out.finished else None


def usage(finals: dict[int, RequestOutput], prompt_of: dict[int, int]) -> r.Usage:
    """Usage of a request whose choices ended with ``finals`` (choice -> output): each prompt counted once,
    every choice's generated tokens."""
    prompts: dict[int, RequestOutput] = {}
    for index, out in finals.items():
        prompts.setdefault(prompt_of[index], out)
    prompt = sum(o.prompt_tokens for o in prompts.values())
    completion = sum(o.completion_tokens for o in finals.values())
    cached = sum(o.num_cached_tokens for o in prompts.values())
    return r.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                   prompt_tokens_details=r.PromptTokensDetails(cached_tokens=cached))


class TokenTexts:
    """The text of single tokens (for log-probabilities), decoded once per token id."""

    def __init__(self, tokenizer) -> None:
        self._text = functools.lru_cache(maxsize=1 << 16)(lambda tid: tokenizer.decode([tid]))

    def __call__(self, token_id: int) -> str:
        return self._text(token_id)


class Renderer:
    """One endpoint's response shapes for one request (its id, model name and creation time)."""

    prefix = ""

    def __init__(self, model: str, texts: TokenTexts, prompt_of: dict[int, int], logprobs: bool,
                 include_usage: bool) -> None:
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model, self.texts, self.prompt_of = model, texts, prompt_of
        self.logprobs, self.include_usage = logprobs, include_usage

    def start(self) -> list[str]:
        """Events sent before the first output."""
        return []

    def chunk(self, index: int, out: RequestOutput) -> str:
        raise NotImplementedError

    def response(self, finals: dict[int, RequestOutput]):
        raise NotImplementedError

    def usage_event(self, finals: dict[int, RequestOutput]) -> str:
        raise NotImplementedError


class CompletionRenderer(Renderer):
    prefix = "cmpl"

    def _logprobs(self, items: Sequence[EngineLogprob], offset: int) -> r.CompletionLogprobs | None:
        if not self.logprobs:
            return None
        lp = r.CompletionLogprobs()
        for item in items:
            text = self.texts(item.token_id)
            lp.tokens.append(text)
            lp.token_logprobs.append(item.logprob)
            lp.top_logprobs.append({self.texts(t): v for t, v in item.top})
            lp.text_offset.append(offset)
            offset += len(text)
        return lp

    def chunk(self, index: int, out: RequestOutput) -> str:
        offset = len(out.text) - len(out.delta_text)
        choice = r.CompletionChoice(index=index, text=out.delta_text, finish_reason=finish_reason(out),
                                    logprobs=self._logprobs(out.delta_logprobs, offset), stop_reason=out.stop_reason)
        return sse(r.Completion(id=self.id, created=self.created, model=self.model, choices=[choice]))

    def response(self, finals: dict[int, RequestOutput]) -> r.Completion:
        choices = [r.CompletionChoice(index=i, text=o.text, finish_reason=finish_reason(o),
                                      logprobs=self._logprobs(o.logprobs, 0), stop_reason=o.stop_reason)
                   for i, o in sorted(finals.items())]
        return r.Completion(id=self.id, created=self.created, model=self.model, choices=choices,
                            usage=usage(finals, self.prompt_of))

    def usage_event(self, finals: dict[int, RequestOutput]) -> str:
        return sse(r.Completion(id=self.id, created=self.created, model=self.model, choices=[],
                                usage=usage(finals, self.prompt_of)))


class ChatRenderer(Renderer):
    prefix = "chatcmpl"

    def _logprobs(self, items: Sequence[EngineLogprob]) -> r.ChatLogprobs | None:
        if not self.logprobs:
            return None

        def top(token_id: int, logprob: float) -> r.TopLogprob:
            text = self.texts(token_id)
            return r.TopLogprob(token=text, logprob=logprob, bytes=list(text.encode("utf-8")))

        return r.ChatLogprobs(content=[r.TokenLogprob(**top(i.token_id, i.logprob).model_dump(),
                                                      top_logprobs=[top(t, v) for t, v in i.top]) for i in items])

    def _chunk(self, choices: list[r.ChatChunkChoice]) -> str:
        return sse(r.ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices))

    def start(self) -> list[str]:
        return [self._chunk([r.ChatChunkChoice(index=i, delta={"role": "assistant", "content": ""})])
                for i in sorted(self.prompt_of)]

    def chunk(self, index: int, out: RequestOutput) -> str:
        delta = {"content": out.delta_text} if out.delta_text or not out.finished else {}
        return self._chunk([r.ChatChunkChoice(index=index, delta=delta, finish_reason=finish_reason(out),
                                              logprobs=self._logprobs(out.delta_logprobs),
                                              stop_reason=out.stop_reason)])

    def response(self, finals: dict[int, RequestOutput]) -> r.ChatCompletion:
        choices = [r.ChatChoice(index=i, message=r.AssistantMessage(content=o.text), finish_reason=finish_reason(o),
                                logprobs=self._logprobs(o.logprobs), stop_reason=o.stop_reason)
                   for i, o in sorted(finals.items())]
        return r.ChatCompletion(id=self.id, created=self.created, model=self.model, choices=choices,
                                usage=usage(finals, self.prompt_of))

    def usage_event(self, finals: dict[int, RequestOutput]) -> str:
        return sse(r.ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[],
                                         usage=usage(finals, self.prompt_of)))
