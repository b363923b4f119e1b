"""Per-request sampling parameters, validated on construction.

:class:`SamplingParams` is an immutable, hashable value. Every bad value is refused in ``__post_init__`` with a
:class:`SamplingParamsError` that names the field and the accepted range, so a gRPC front end can map it to an
``INVALID_ARGUMENT`` status without parsing messages. This module deliberately does not import torch.

Semantics (the sampler in :mod:`engine.sampler` implements them):

* ``temperature`` 0 means greedy (argmax). Any temperature below :data:`GREEDY_TEMPERATURE` is treated as greedy too,
  because dividing logits by a tiny temperature overflows float32.
* ``repetition_penalty`` follows Hugging Face: a logit of a token seen anywhere in prompt + output is divided by the
  penalty when positive and multiplied by it when negative.
* ``presence_penalty`` / ``frequency_penalty`` follow OpenAI, over generated tokens only:
  ``logit -= frequency_penalty * count + presence_penalty * (count > 0)``.
* ``min_new_tokens``: while fewer tokens than this have been generated, ``stop_token_ids`` and (unless
  ``ignore_eos``) the EOS ids cannot be sampled.
* ``ignore_eos``: EOS does not end generation; the EOS token itself may still be sampled and is then an ordinary
  token.
* ``logprobs``: ``None`` returns no log-probabilities; ``0`` returns only the sampled token's; ``n`` in 1..20 also
  returns the top-``n`` alternatives.
* ``response_format``: the output must match this format (:mod:`engine.scheduling.response_format`); tokens that
  cannot continue it are masked before temperature and truncation, so log-probabilities are those of the
  constrained distribution. The format decides where the output ends, so it cannot be combined with
  ``ignore_eos`` or ``min_new_tokens``.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from engine.scheduling.response_format import ResponseFormat

#: Temperatures below this are treated as greedy decoding.
GREEDY_TEMPERATURE = 1e-5
#: Ranges the float32 sampler handles without producing a row of no finite logit (such a NaN row fails the whole
#: step, i.e. every request batched with it): the logits are divided by the temperature, and multiplied or
#: divided by the repetition penalty.
MAX_TEMPERATURE = 1e4
REPETITION_PENALTY_RANGE = (1e-4, 1e4)
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_SEED = 2**63 - 1


class SamplingParamsError(ValueError):
    """A sampling parameter is out of range. ``field`` names it, ``reason`` says what was expected."""

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"invalid sampling parameter {field!r}: {reason}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _require_int(name: str, value: Any, lo: int, hi: int | None, expected: str) -> None:
    if not _is_int(value) or value < lo or (hi is not None and value > hi):
        raise SamplingParamsError(name, f"expected {expected}, got {value!r}")


def _require_real(name: str, value: Any, ok: bool, expected: str) -> None:
    if not _is_real(value) or not math.isfinite(value) or not ok:
        raise SamplingParamsError(name, f"expected {expected}, got {value!r}")


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the tokens of one request. See the module docstring for the exact semantics.

    ``stop`` accepts a single string or any iterable of strings and is stored as a tuple; ``stop_token_ids``
    likewise accepts any iterable of ints.
    """

    max_new_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_new_tokens: int = 0
    logprobs: int | None = None
    skip_special_tokens: bool = True
    response_format: ResponseFormat | None = None

    def __post_init__(self) -> None:
        self._normalise_sequences()
        _require_int("max_new_tokens", self.max_new_tokens, 1, None, "an integer >= 1")
        _require_int("min_new_tokens", self.min_new_tokens, 0, self.max_new_tokens,
                     f"an integer in [0, max_new_tokens={self.max_new_tokens}]")
        t = self.temperature
        _require_real("temperature", t, _is_real(t) and 0 <= t <= MAX_TEMPERATURE,
                      f"a number in [0, {MAX_TEMPERATURE:g}] (0 means greedy)")
        _require_int("top_k", self.top_k, 0, None, "an integer >= 0 (0 disables top-k)")
        p = self.top_p
        _require_real("top_p", p, _is_real(p) and 0 < p <= 1, "a number in (0, 1]")
        m = self.min_p
        _require_real("min_p", m, _is_real(m) and 0 <= m <= 1, "a number in [0, 1]")
        r, (r_lo, r_hi) = self.repetition_penalty, REPETITION_PENALTY_RANGE
        _require_real("repetition_penalty", r, _is_real(r) and r_lo <= r <= r_hi,
                      f"a number in [{r_lo:g}, {r_hi:g}] (1 disables it)")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            _require_real(name, v, _is_real(v) and -2 <= v <= 2, "a number in [-2, 2]")
        if self.seed is not None:
            _require_int("seed", self.seed, 0, MAX_SEED, f"None or an integer in [0, {MAX_SEED}]")
        if self.logprobs is not None:
            _require_int("logprobs", self.logprobs, 0, MAX_LOGPROBS, f"None or an integer in [0, {MAX_LOGPROBS}]")
        for name in ("ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise SamplingParamsError(name, f"expected a bool, got {getattr(self, name)!r}")
        self._check_stop()
        self._check_response_format()

    def _check_response_format(self) -> None:
        if self.response_format is None:
            return
        if not isinstance(self.response_format, ResponseFormat):
            raise SamplingParamsError("response_format", f"expected None or a ResponseFormat, got "
                                                         f"{type(self.response_format).__name__}")
        if self.ignore_eos:
            raise SamplingParamsError("ignore_eos", "cannot be combined with a response_format: the format decides "
                                                    "where the output ends")
        if self.min_new_tokens:
            raise SamplingParamsError("min_new_tokens", "expected 0 with a response_format: the format decides "
                                                        "where the output ends")

    def _normalise_sequences(self) -> None:
        stop: Any = self.stop
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        elif isinstance(stop, Iterable):
            stop = tuple(stop)
        else:
            raise SamplingParamsError("stop", f"expected a string or a list of strings, got {stop!r}")
        object.__setattr__(self, "stop", stop)
        ids: Any = self.stop_token_ids
        if ids is None:
            ids = ()
        elif isinstance(ids, Iterable) and not isinstance(ids, (str, bytes)):
            ids = tuple(ids)
        else:
            raise SamplingParamsError("stop_token_ids", f"expected a list of token ids, got {ids!r}")
        object.__setattr__(self, "stop_token_ids", ids)

    def _check_stop(self) -> None:
        if len(self.stop) > MAX_STOP_STRINGS:
            raise SamplingParamsError("stop", f"expected at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        for s in self.stop:
            if not isinstance(s, str) or not s or len(s) > MAX_STOP_STRING_CHARS:
                raise SamplingParamsError(
                    "stop", f"expected non-empty strings of at most {MAX_STOP_STRING_CHARS} characters, got {s!r}")
        for tid in self.stop_token_ids:
            if not _is_int(tid) or tid < 0:
                raise SamplingParamsError("stop_token_ids", f"expected non-negative integers, got {tid!r}")

    @property
    def greedy(self) -> bool:
        """True when decoding is argmax: ``temperature`` below :data:`GREEDY_TEMPERATURE` (0 in practice)."""
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def has_penalties(self) -> bool:
        """True when any of the repetition / presence / frequency penalties changes logits."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def stops_on(self, token_id: int, eos_token_ids: Iterable[int]) -> bool:
        """Whether sampling ``token_id`` ends the request: a stop token id, or an EOS id unless ``ignore_eos``."""
        if token_id in self.stop_token_ids:
            return True
        return not self.ignore_eos and token_id in tuple(eos_token_ids)

    def check_context(self, prompt_len: int, max_model_len: int) -> None:
        """Refuse (field ``max_new_tokens``) a request whose prompt plus ``max_new_tokens`` exceeds the context."""
        if prompt_len + self.max_new_tokens > max_model_len:
            room = max_model_len - prompt_len
            expected = f"max_new_tokens <= {room}" if room >= 1 else "a shorter prompt"
            raise SamplingParamsError(
                "max_new_tokens",
                f"prompt of {prompt_len} tokens + max_new_tokens={self.max_new_tokens} exceeds the model's context "
                f"of {max_model_len} tokens; expected {expected}")

    def check_vocab(self, vocab_size: int) -> None:
        """Refuse (field ``stop_token_ids``) stop token ids outside ``[0, vocab_size)``."""
        bad = [t for t in self.stop_token_ids if t >= vocab_size]
        if bad:
            raise SamplingParamsError(
                "stop_token_ids", f"expected token ids in [0, {vocab_size}), got {bad}")
