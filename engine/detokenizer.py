"""Incremental (streaming) detokenization with stop-string detection.

:class:`IncrementalDetokenizer` turns generated token ids into text deltas, one :meth:`~IncrementalDetokenizer.add`
per token, in the manner of vLLM / TGI: it keeps a *prefix offset* and a *read offset* into the token ids and decodes
the short window ``ids[prefix:]``; the new text is what that decode adds to the decode of ``ids[prefix:read]``.
Decoding a window of several tokens (rather than the new token alone) keeps sentencepiece word-boundary spaces
right, and while the window's decode ends with U+FFFD (an incomplete UTF-8 sequence from byte-level or
byte-fallback tokens) nothing is emitted and the offsets stay put until the character completes.

Contract (without stop strings): ``"".join(deltas) + finish()`` equals
``tokenizer.decode(output_ids, skip_special_tokens=..., clean_up_tokenization_spaces=False)`` whenever the output
is valid UTF-8 (always for byte-level BPE; a byte-fallback decoder that replaces a whole invalid byte run may differ
in replacement characters only). With ``continuation=True`` the reference is instead the text the output adds to
the prompt, ``decode(prompt + output)[len(decode(prompt)):]`` (vLLM's convention: a sentencepiece output that starts
a new word then starts with a space).

Stop strings are searched in the generated text only. The first stop string to be *completed* while reading the
text left to right wins (earliest end, then earliest start); the final text is everything before it, ``stopped``
becomes True and ``stop_reason`` is the matched string. Deltas never contain a stop string nor any character that
may still turn out to begin one: the longest tail of the text that is a proper prefix of a stop string is held back
until disambiguated (at most ``max(len(stop)) - 1`` characters). This module does not import torch.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol

REPLACEMENT_CHAR = "\ufffd"
#: Prompt tokens decoded as left context in ``continuation`` mode.
PROMPT_CONTEXT_TOKENS = 5


class Tokenizer(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool = ..., **kwargs: Any) -> str: ...


class IncrementalDetokenizer:
    """Streams the text of one request's generated tokens. See the module docstring for the contract.

    Args:
        tokenizer: anything with a Hugging Face style ``decode(ids, skip_special_tokens=...)``.
        prompt_token_ids: the request's prompt (used as left context only when ``continuation`` is set).
        skip_special_tokens: drop special tokens from the text.
        stop: stop strings (a single string is accepted); empty strings are ignored.
        continuation: decode the output as a continuation of the prompt (see module docstring).
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int], skip_special_tokens: bool = True,
                 stop: str | Iterable[str] = (), *, continuation: bool = False) -> None:
        self.tokenizer = tokenizer
        self.prompt_token_ids = list(prompt_token_ids)
        self.skip_special_tokens = skip_special_tokens
        self.stop: tuple[str, ...] = tuple(s for s in ((stop,) if isinstance(stop, str) else stop) if s)
        self._max_stop = max((len(s) for s in self.stop), default=0)
        self._decode_kwargs = self._probe_decode_kwargs()
        context = self.prompt_token_ids[-PROMPT_CONTEXT_TOKENS:] if continuation else []
        self._ids: list[int] = list(context)  # decode window source: context + output
        self._n_context = len(context)
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._text = ""        # token-level text: complete characters only (until finish)
        self._emitted = 0      # chars of _text handed out
        self.stopped = False
        self.stop_reason: str | None = None
        self.finished = False

    def _probe_decode_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"skip_special_tokens": self.skip_special_tokens,
                                  "clean_up_tokenization_spaces": False}
        try:
            self.tokenizer.decode([], **kwargs)
        except TypeError:  # e.g. a raw ``tokenizers.Tokenizer``
            kwargs.pop("clean_up_tokenization_spaces")
        return kwargs

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, **self._decode_kwargs) if ids else ""

    # -- public state -------------------------------------------------------------------------------------------

    @property
    def output_token_ids(self) -> list[int]:
        """Generated token ids received so far (up to and including the one that completed a stop string)."""
        return self._ids[self._n_context:]

    @property
    def text(self) -> str:
        """The output text so far: everything emitted plus any stop-string hold-back, cut at a matched stop string.

        Excludes an incomplete trailing UTF-8 sequence until :meth:`finish`.
        """
        return self._text

    @property
    def emitted_text(self) -> str:
        """The concatenation of every delta returned so far."""
        return self._text[:self._emitted]

    # -- streaming ----------------------------------------------------------------------------------------------

    def add(self, token_id: int) -> str:
        """Feed one generated token; return the text that became final (possibly ``""``).

        After a stop string matched (``stopped``) or after :meth:`finish`, further tokens are ignored and ``""``
        is returned.
        """
        if self.stopped or self.finished:
            return ""
        self._ids.append(int(token_id))
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT_CHAR):
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            return self._push(new_text[len(prefix_text):], final=False)
        return ""

    def extend(self, token_ids: Iterable[int]) -> str:
        """:meth:`add` each token in turn; return the joined deltas."""
        return "".join(self.add(t) for t in token_ids)

    def finish(self) -> str:
        """Flush: emit any held-back tail (incomplete UTF-8 as U+FFFD, stop-string candidates). Idempotent."""
        if self.finished:
            return ""
        self.finished = True
        if self.stopped:
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        self._prefix_offset = self._read_offset = len(self._ids)
        tail = new_text[len(prefix_text):] if len(new_text) > len(prefix_text) else ""
        return self._push(tail, final=True)

    def _push(self, delta: str, final: bool) -> str:
        """Append token-level text, look for stop strings in the new region, return what may be emitted."""
        old_len = len(self._text)
        self._text += delta
        if self.stop:
            cut = self._find_stop(old_len)
            if cut is not None:
                start, matched = cut
                self._text = self._text[:start]
                self.stopped = True
                self.stop_reason = matched
                final = True
        end = len(self._text) if final else len(self._text) - self._held_back()
        if end <= self._emitted:
            return ""
        out = self._text[self._emitted:end]
        self._emitted = end
        return out

    def _find_stop(self, old_len: int) -> tuple[int, str] | None:
        """The stop occurrence that ends first (then starts first) among those ending after ``old_len``."""
        best: tuple[int, int, str] | None = None
        for s in self.stop:
            i = self._text.find(s, max(0, old_len - len(s) + 1))
            if i >= 0:
                key = (i + len(s), i, s)
                if best is None or key[:2] < best[:2]:
                    best = key
        return None if best is None else (best[1], best[2])

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string."""
        text = self._text
        if not self.stop or not text:
            return 0
        last = text[-1]
        best = 0
        for s in self.stop:
            # Candidate lengths k end with s[k-1] == last; try the longest first.
            k = min(len(s) - 1, len(text))
            while k > best:
                k = s.rfind(last, 0, k) + 1
                if k <= best:
                    break
                if text.endswith(s[:k]):
                    best = k
                    break
                k -= 1
        return best
