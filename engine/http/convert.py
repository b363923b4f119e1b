"""HTTP request bodies -> engine requests: the prompt, :class:`SamplingParams` and :class:`ResponseFormat` of
each choice. Pure field mapping, as :mod:`engine.server.proto_convert` does for gRPC: every value is checked by
the engine's own types (``SamplingParams``, ``ResponseFormat``) or by ``LLMEngine.add_request``; this module only
refuses what the wire format itself rules out (a field the engine does not do, two formats at once), with
:class:`~engine.server.status.InvalidArgument` naming the body field.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from engine.http.errors import HttpCallFields
from engine.http.requests import MAX_CHOICES, CompletionRequest, SamplingBody
from engine.scheduling.response_format import ResponseFormat
from engine.scheduling.sampling_params import MAX_SEED, SamplingParams
from engine.server.status import InvalidArgument

#: OpenAI's default ``max_tokens`` of a completion.
COMPLETION_MAX_TOKENS = 16


@dataclass(frozen=True)
class Job:
    """One engine request of an HTTP request: choice ``index`` (``prompt_index * n + j``) of prompt
    ``prompt_index``."""

    index: int
    prompt_index: int
    prompt: Any  # str | list[int] | a chat prompt
    params: SamplingParams


def refuse_unsupported(body: SamplingBody, fields: dict[str, Any]) -> None:
    """InvalidArgument for the first of ``fields`` (name -> its neutral value) that the body sets otherwise."""
    for name, neutral in fields.items():
        value = getattr(body, name)
        if value is not None and value != neutral:
            raise InvalidArgument(name, f"not supported by this server (expected it unset or {neutral!r})")


def response_format(body: SamplingBody, call: HttpCallFields) -> ResponseFormat | None:
    """The format the body asks for (``response_format`` or one of vLLM's ``guided_*``), None for none; the
    format's own checks raise ``ResponseFormatError``, which :class:`HttpCallFields` maps to the field used."""
    given = {name: getattr(body, name) for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
             if getattr(body, name) is not None}
    rf = body.response_format
    if rf is not None and rf.type != "text":
        given["response_format"] = rf
    if len(given) > 1:
        raise InvalidArgument(sorted(given)[1], f"set at most one output format, got {', '.join(sorted(given))}")
    if not given:
        return None
    (name, value), = given.items()
    call.format_field = name
    if name == "guided_json":
        return ResponseFormat.json_schema(value)
    if name == "guided_regex":
        return ResponseFormat.regex(value)
    if name == "guided_choice":
        return ResponseFormat.choice(value)
    if name == "guided_grammar":
        return ResponseFormat.grammar(value)
    if value.type == "json_object":
        return ResponseFormat.json_object()
    if value.json_schema is None or value.json_schema.schema_ is None:
        raise InvalidArgument("response_format", "type json_schema needs json_schema.schema")
    call.format_field = "response_format.json_schema.schema"
    return ResponseFormat.json_schema(value.json_schema.schema_)


def sampling_params(body: SamplingBody, max_tokens: int, logprobs: int | None,
                    fmt: ResponseFormat | None) -> SamplingParams:
    """The engine parameters of ``body``; a field the body leaves unset keeps the engine default. vLLM's
    ``top_k: -1`` (no top-k) is the engine's 0."""
    kw: dict[str, Any] = {}
    for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
                 "seed"):
        if getattr(body, name) is not None:
            kw[name] = getattr(body, name)
    if body.top_k is not None:
        kw["top_k"] = 0 if body.top_k == -1 else body.top_k
    return SamplingParams(max_new_tokens=max_tokens, stop=body.stop, stop_token_ids=body.stop_token_ids or (),
                          ignore_eos=body.ignore_eos, min_new_tokens=body.min_tokens, logprobs=logprobs,
                          skip_special_tokens=body.skip_special_tokens, response_format=fmt, **kw)


def fan_out(prompts: Sequence[Any], params: SamplingParams, n: int) -> list[Job]:
    """``n`` jobs per prompt. With a seed, choice ``j`` of a prompt samples with ``seed + j`` (so the ``n``
    choices differ and a request is reproducible); the first keeps the seed as given."""
    if len(prompts) * n > MAX_CHOICES:
        raise InvalidArgument("n", f"{len(prompts)} prompts x n={n} choices is more than {MAX_CHOICES}")
    jobs = []
    for p, prompt in enumerate(prompts):
        for j in range(n):
            choice = params if j == 0 or params.seed is None else \
                dataclasses.replace(params, seed=(params.seed + j) & MAX_SEED)
            jobs.append(Job(p * n + j, p, prompt, choice))
    return jobs


def completion_jobs(body: CompletionRequest, call: HttpCallFields) -> list[Job]:
    """The engine requests of a completion body: one prompt (a text or token ids) or a list of them."""
    refuse_unsupported(body, {"echo": False, "suffix": None, "logit_bias": {}, "best_of": body.n})
    call.prompt_field = "prompt"
    prompt = body.prompt
    prompts = prompt if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else [prompt]
    max_tokens = COMPLETION_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    params = sampling_params(body, max_tokens, body.logprobs, response_format(body, call))
    return fan_out(prompts, params, body.n)
