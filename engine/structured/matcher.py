"""One request's position in its response format's grammar (a fresh copy of the compiled grammar per request).

The matcher follows the request's output tokens rather than being told about each one: :meth:`GrammarMatcher.sync`
consumes whatever output tokens it has not seen yet and, should the output ever be shorter than what it consumed
or differ from it (a recomputation that changed tokens), rolls back to the common prefix (or, where the grammar
engine cannot roll that far, rebuilds from the start). Preemption keeps a request's output tokens, so a resumed
request's matcher simply continues.

Not thread-safe: the engine thread alone uses a request's matcher once the request is queued.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.scheduling.response_format import ResponseFormatError

#: Longest grammar-engine message passed on to a client (its error states can carry long parser dumps).
MAX_ERROR_CHARS = 400


def short_error(text: str) -> str:
    """A grammar-engine message without its parser-state dump, at most :data:`MAX_ERROR_CHARS` characters."""
    text = text.split("\n<state>", 1)[0].strip()
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS - 3] + "..."


class GrammarMatcher:
    """Wraps one ``llguidance.LLMatcher``; ``field`` names the request field of the format (for errors);
    ``vocab_size`` is the number of tokens its bitmask rows cover (at least the model's logits)."""

    def __init__(self, matcher, field: str, vocab_size: int) -> None:
        self._m = matcher
        self.field = field
        self.vocab_size = vocab_size
        self._tokens: list[int] = []  # consumed so far
        self._error: str | None = None

    @property
    def num_consumed(self) -> int:
        return len(self._tokens)

    @property
    def is_complete(self) -> bool:
        """True once the format is complete and nothing may follow (or after an end-of-sequence token)."""
        return self._error is None and self._m.is_stopped()

    @property
    def error(self) -> str | None:
        """Why the matcher cannot go on (a token outside the grammar, a grammar too complex to follow), or None."""
        return self._error

    def sync(self, tokens: Sequence[int]) -> None:
        """Bring the matcher to the end of ``tokens`` (the request's output so far). Raises
        :class:`ResponseFormatError` when a token does not continue the format."""
        if self._error is not None:
            raise ResponseFormatError(self.field, self._error)
        n = len(self._tokens)
        if len(tokens) < n or (n and tokens[n - 1] != self._tokens[-1]):
            self._rewind(tokens)
            n = len(self._tokens)
        for i in range(n, len(tokens)):
            token = int(tokens[i])
            if not self._m.consume_token(token):
                self._error = (f"output token {token} at position {i} does not continue the format: "
                               f"{short_error(self._m.get_error() or 'rejected by the grammar')}")
                raise ResponseFormatError(self.field, self._error)
            self._tokens.append(token)

    def _rewind(self, tokens: Sequence[int]) -> None:
        common = 0
        for a, b in zip(self._tokens, tokens):
            if a != b:
                break
            common += 1
        back = len(self._tokens) - common
        if back and not self._m.rollback(back):
            self._m.reset()
            del self._tokens[:]
            return
        del self._tokens[common:]

    def fill_bitmask(self, row: torch.Tensor, tokens: Sequence[int]) -> bool:
        """Sync to ``tokens``, then write the allowed next tokens into ``row`` (a contiguous 1-D int32 CPU
        tensor of the bitmask's width). False when the matcher cannot go on: ``row`` then allows every token,
        and :meth:`sync` raises the reason when the request's next token is recorded."""
        try:
            self.sync(tokens)
        except ResponseFormatError:
            row.fill_(-1)
            return False
        self._m.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())
        if self._m.is_error():
            self._error = f"the grammar engine cannot follow the format here: {short_error(self._m.get_error())}"
            row.fill_(-1)
            return False
        return True
