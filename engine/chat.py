"""Chat prompts: a list of role/content messages rendered into prompt token ids with a chat template.

The template is the checkpoint's own (``tokenizer.chat_template``: from ``tokenizer_config.json``,
``chat_template.jinja`` or a GGUF file's metadata), unless the request's adapter directory carries one of its own
(``chat_template.jinja``, ``chat_template.json`` or a ``chat_template`` key in ``tokenizer_config.json``), which
then wins for requests to that adapter. Rendering is transformers' ``apply_chat_template`` with the generation
prompt added, tokenized exactly as it tokenizes (no special tokens added beyond what the template writes), so a
chat request's prompt equals what ``apply_chat_template(..., add_generation_prompt=True)`` gives.

A template marks the end of an assistant turn with a token of its own (ChatML's ``<|im_end|>``, Llama 3's
``<|eot_id|>``); :meth:`ChatTemplates.render` finds it by rendering a probe conversation, and the engine ends a
chat request there as at an end-of-sequence token, even where the checkpoint's EOS is another token.
"""
from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from aspen.errors import AdapterError
from engine.scheduling.errors import RequestError

#: The roles a message may have.
ROLES = ("system", "user", "assistant")
#: Files of an adapter directory that may hold its chat template, in the order they are read.
ADAPTER_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "tokenizer_config.json")
_PROBE = "\u2063aspen-end-of-turn-probe\u2063"


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class ChatPrompt:
    """A prompt given as chat messages (see :func:`chat_prompt` to build one from plain mappings)."""

    messages: tuple[ChatMessage, ...]


@dataclass(frozen=True)
class RenderedChat:
    prompt_token_ids: list[int]
    end_of_turn_ids: tuple[int, ...]  # tokens that end the assistant's turn (empty: the template has none)


def chat_prompt(messages: Iterable[ChatMessage | Mapping]) -> ChatPrompt:
    """A :class:`ChatPrompt` from messages or ``{"role": ..., "content": ...}`` mappings (checked when rendered)."""
    out = []
    for i, m in enumerate(messages):
        if isinstance(m, ChatMessage):
            out.append(m)
        elif isinstance(m, Mapping):
            out.append(ChatMessage(m.get("role"), m.get("content")))
        else:
            raise RequestError(f"messages[{i}]", f"expected a message with a role and content, got "
                                                 f"{type(m).__name__}")
    return ChatPrompt(tuple(out))


def check_messages(prompt: ChatPrompt, max_chars: int) -> list[dict[str, str]]:
    """The messages as the template takes them; RequestError naming the message at fault when there are none, a
    role is not one of :data:`ROLES`, a content is not a string, or all contents together exceed ``max_chars``."""
    if not isinstance(prompt.messages, tuple) or not prompt.messages:
        raise RequestError("messages", "expected at least one message")
    out, chars = [], 0
    for i, m in enumerate(prompt.messages):
        if m.role not in ROLES:
            raise RequestError(f"messages[{i}].role", f"expected one of {', '.join(ROLES)}, got {m.role!r:.40}")
        if not isinstance(m.content, str):
            raise RequestError(f"messages[{i}].content", f"expected a string, got {type(m.content).__name__}")
        check_unicode(f"messages[{i}].content", m.content)
        chars += len(m.content)
        out.append({"role": m.role, "content": m.content})
    if chars > max_chars:
        raise RequestError("messages", f"{chars} characters of content can never fit the context "
                                       f"(at most {max_chars} characters)")
    return out


def check_unicode(field: str, text: str) -> None:
    """RequestError naming ``field`` when ``text`` holds a lone surrogate (not Unicode text: no tokenizer takes
    it; JSON's ``"\\ud800"`` decodes to one)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(field, f"not valid Unicode text: a lone surrogate at character {e.start}") from None


class ChatTemplates:
    """Renders chat prompts for one tokenizer, with per-adapter templates read once per file version.
    Thread-safe (requests are validated on the callers' threads)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        base = getattr(tokenizer, "chat_template", None)
        self.base_template: str | None = base if isinstance(base, str) and base else None
        self._adapter: dict[str, tuple[tuple, str | None]] = {}  # adapter dir -> (file stamps, template)
        self._end_of_turn: dict[str, tuple[int, ...]] = {}  # template -> its end-of-turn ids
        self._lock = threading.Lock()

    def template_for(self, adapter_dir: str | None) -> str | None:
        """The adapter directory's own template if it has one, else the checkpoint's (None: neither has one)."""
        if adapter_dir is not None:
            own = self._adapter_template(adapter_dir)
            if own is not None:
                return own
        return self.base_template

    def render(self, prompt: ChatPrompt, max_chars: int, adapter_dir: str | None = None) -> RenderedChat:
        """Prompt token ids of ``prompt`` with the generation prompt added, and the template's end-of-turn ids.

        RequestError("messages") for messages :func:`check_messages` refuses, a model (and adapter) without a
        chat template, or a template that refuses the conversation (e.g. roles that do not alternate)."""
        messages = check_messages(prompt, max_chars)
        template = self.template_for(adapter_dir)
        if template is None:
            raise RequestError("messages", "this model has no chat template (nor has the adapter): send the prompt "
                                           "as text or token ids")
        try:
            ids = self.tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                                     tokenize=True, return_dict=False)
        except Exception as e:  # noqa: BLE001 -- a template raises what its author chose (jinja's own errors too)
            raise RequestError("messages", f"the chat template refused the messages: {e}") from None
        if ids and isinstance(ids[0], list):
            ids = ids[0]
        return RenderedChat([int(t) for t in ids], self._end_of_turn_ids(template))

    # ------------------------------------------------------------------ internals
    def _end_of_turn_ids(self, template: str) -> tuple[int, ...]:
        with self._lock:
            if template in self._end_of_turn:
                return self._end_of_turn[template]
        found = self._probe_end_of_turn(template)
        with self._lock:
            self._end_of_turn[template] = found
        return found

    def _probe_end_of_turn(self, template: str) -> tuple[int, ...]:
        """The special token the template writes right after an assistant message's content, if any."""
        tok = self.tokenizer
        conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
        try:
            text = tok.apply_chat_template(conversation, chat_template=template, tokenize=False)
        except Exception:  # noqa: BLE001 -- a template that refuses the probe has no end of turn we can find
            return ()
        if not isinstance(text, str) or _PROBE not in text:
            return ()
        after = text.split(_PROBE, 1)[1].lstrip(" ")
        ids = tok(after, add_special_tokens=False).input_ids if after else []
        special = set(getattr(tok, "all_special_ids", ())) | {
            i for i, t in getattr(tok, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
        return (int(ids[0]),) if ids and ids[0] in special else ()

    def _adapter_template(self, adapter_dir: str) -> str | None:
        stamps = tuple(_stamp(os.path.join(adapter_dir, f)) for f in ADAPTER_TEMPLATE_FILES)
        with self._lock:
            cached = self._adapter.get(adapter_dir)
            if cached is not None and cached[0] == stamps:
                return cached[1]
        template = _read_adapter_template(adapter_dir)
        with self._lock:
            self._adapter[adapter_dir] = (stamps, template)
        return template


def _stamp(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def _read_adapter_template(adapter_dir: str) -> str | None:
    """The chat template an adapter directory carries, or None. A file that exists but cannot be read as a
    template is an AdapterError naming it (the adapter would otherwise silently chat in the base model's
    format)."""
    jinja = os.path.join(adapter_dir, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read() or None
    for name in ("chat_template.json", "tokenizer_config.json"):
        path = os.path.join(adapter_dir, name)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            raise AdapterError(f"adapter directory {adapter_dir!r}: {name} cannot be read for its chat template "
                               f"({e})") from None
        template = data.get("chat_template") if isinstance(data, dict) else None
        if isinstance(template, str) and template:
            return template
    return None
