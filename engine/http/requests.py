"""The request bodies of the OpenAI-compatible HTTP API, as pydantic models (strict: a number is never read from
a string, a bool never from a number). Unknown fields are ignored, as OpenAI-compatible servers do, so clients
that send newer fields keep working; fields that would change the output and that the engine does not do
(``tools``, ``logit_bias``, ``echo``, ...) are declared so that :mod:`engine.http.convert` can refuse them by
name.

These models check only the shape of a body (types, and the fan-out bound ``n``); every rule about the values is
the engine's (``SamplingParams``, ``ResponseFormat``, ``LLMEngine.add_request``).
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: Most choices one request may ask for (``n`` times the number of prompts): each is an engine request.
MAX_CHOICES = 128


class Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)


def _lone_surrogate(value: Any, path: str) -> str | None:
    """The path of the first string in ``value`` holding a lone surrogate (JSON's ``"\\ud800"`` decodes to one:
    no Unicode text, which no tokenizer or file system takes), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
    elif isinstance(value, dict):
        for k, v in value.items():
            found = _lone_surrogate(k, path) or _lone_surrogate(v, f"{path}.{k}" if path else str(k))
            if found:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = _lone_surrogate(v, f"{path}.{i}" if path else str(i))
            if found:
                return found
    return None


class RequestBody(Body):
    """A whole request body: every string in it must be Unicode text."""

    @model_validator(mode="before")
    @classmethod
    def _text(cls, data: Any) -> Any:
        where = _lone_surrogate(data, "")
        if where is not None:
            raise ValueError(f"{where} holds a lone UTF-16 surrogate: expected Unicode text")
        return data


class StreamOptions(Body):
    include_usage: bool = False


class JsonSchemaSpec(Body):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormatBody(Body):
    """OpenAI's ``response_format``: ``text`` (no constraint), ``json_object`` or ``json_schema``."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


class SamplingBody(RequestBody):
    """What completions and chat completions share: the model (the base model's served name or an adapter id),
    OpenAI's sampling fields, and vLLM's extras (``top_k``, ``min_p``, ``repetition_penalty``, ``min_tokens``,
    ``ignore_eos``, ``stop_token_ids``, ``skip_special_tokens``, the ``guided_*`` formats)."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormatBody | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    best_of: int | None = None
    # vLLM's extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    guided_json: dict[str, Any] | bool | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None


class CompletionRequest(SamplingBody):
    """``POST /v1/completions``: ``prompt`` is a text, token ids, or a list of either (one prompt each)."""

    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None


class TextPart(Body):
    type: Literal["text"]
    text: str


class MessageBody(Body):
    """One chat message: a role and its text (a string, or a list of text parts, which are joined)."""

    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatCompletionRequest(SamplingBody):
    """``POST /v1/chat/completions``. ``max_completion_tokens`` wins over ``max_tokens``; without either the
    output may fill the rest of the context."""

    messages: list[MessageBody]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None


class LoadLoraAdapterRequest(RequestBody):
    """vLLM's ``POST /v1/load_lora_adapter``: the adapter id, and its directory below the adapter root (default:
    the id itself)."""

    lora_name: str
    lora_path: str | None = None


class UnloadLoraAdapterRequest(RequestBody):
    """vLLM's ``POST /v1/unload_lora_adapter``."""

    lora_name: str
    lora_int_id: int | None = None
