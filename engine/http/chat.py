"""Chat completion bodies -> engine chat requests: the messages as a :class:`~engine.chat.ChatPrompt` (rendered
and checked by the engine: roles, the chat template of the model or of the adapter), the sampling parameters,
and ``max_tokens`` when the body gives none.

Without ``max_completion_tokens`` / ``max_tokens`` a chat completion may fill the rest of the context, as OpenAI's
and vLLM's do: the room is counted on a worker thread by rendering the prompt with the template the engine will
use (the adapter registered first, as ``add_request`` registers it); every refusal of that rendering is the
engine's own, raised before anything is queued.
"""
from __future__ import annotations

from engine.chat import ChatMessage, ChatPrompt
from engine.http.convert import Job, fan_out, refuse_unsupported, response_format, sampling_params
from engine.http.errors import HttpCallFields
from engine.http.generation import Host
from engine.http.requests import ChatCompletionRequest, MessageBody
from engine.llm_engine import LLMEngine
from engine.server.status import InvalidArgument


def _message(m: MessageBody) -> ChatMessage:
    """A message as the engine takes it: text parts joined; a missing content is the engine's to refuse."""
    content = "".join(p.text for p in m.content) if isinstance(m.content, list) else m.content
    return ChatMessage(m.role, content)


def context_room(engine: LLMEngine, prompt: ChatPrompt, adapter: str | None) -> int:
    """Tokens left in the context after ``prompt`` rendered for ``adapter`` (at least 1: a prompt that fills the
    context is then refused by the engine, naming it)."""
    adapter_dir = None
    if adapter is not None and engine.adapter_cache is not None:
        engine.adapter_cache.prefetch(adapter)  # registers it, as add_request does: its directory may hold a template
        adapter_dir = engine.adapter_cache.path(adapter)
    rendered = engine.chat_templates.render(prompt, engine.max_prompt_chars, adapter_dir)
    return max(1, engine.max_model_len - len(rendered.prompt_token_ids))


async def chat_jobs(host: Host, body: ChatCompletionRequest, call: HttpCallFields, adapter: str | None) -> list[Job]:
    """The engine requests of a chat completion body (``n`` choices of one conversation)."""
    refuse_unsupported(body, {"tools": [], "functions": [], "logit_bias": {}, "best_of": body.n})
    if body.tool_choice not in (None, "none"):
        raise InvalidArgument("tool_choice", "tool calls are not supported by this server (expected it unset or "
                                             "'none')")
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidArgument("top_logprobs", "needs logprobs: true")
    call.prompt_field = "messages"
    prompt = ChatPrompt(tuple(_message(m) for m in body.messages))
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if body.max_completion_tokens is not None:
        call.renamed["max_new_tokens"] = "max_completion_tokens"
    if max_tokens is None:
        max_tokens = await host.run_blocking(context_room, host.engine, prompt, adapter)
    call.renamed["logprobs"] = "top_logprobs"
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = sampling_params(body, max_tokens, logprobs, response_format(body, call))
    return fan_out([prompt], params, body.n)
