"""Compiling response formats into grammars for one tokenizer, off the engine thread, with a time limit and an
LRU cache by content.

:meth:`GrammarCompiler.matcher` is what ``LLMEngine.add_request`` calls (on the caller's thread): it returns a
fresh :class:`~engine.structured.matcher.GrammarMatcher` for the format, or raises
:class:`~engine.scheduling.response_format.ResponseFormatError` naming the field and the problem, before the
request is queued. Compilation runs on a small worker pool; a compile that is not done within ``timeout_s`` is
refused (the worker finishes it in the background, bounded by the grammar engine's fuel limits, and caches the
result), so neither the caller nor the engine thread ever waits longer than that. Concurrent requests for the
same format share one compile. The cache maps (kind, specification) to the compiled grammar, or to the reason
it was refused, so a repeated bad format costs a dictionary lookup.

The grammar engine's view of the tokenizer (every token's bytes) is built once, on the first constrained request.
JSON is generated compact (no whitespace between tokens: a model cannot loop on whitespace); a schema may turn
flexible whitespace back on with ``"x-guidance": {"whitespace_flexible": true}``.
"""
from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import torch

from engine.scheduling.response_format import ResponseFormat, ResponseFormatError
from engine.structured.bitmask import words_for
from engine.structured.matcher import GrammarMatcher, short_error

log = logging.getLogger("aspen.engine")

#: Options of every JSON grammar (a schema's own "x-guidance" overrides them).
JSON_OPTIONS = {"whitespace_flexible": False}


@dataclass(frozen=True)
class CompilerStats:
    compiled: int  # formats compiled (successfully or not)
    hits: int  # formats served from the cache
    refused: int  # requests refused: a bad format, or one too slow to compile
    timeouts: int  # of those, compiles that ran past the time limit
    cached: int  # entries in the cache now


@dataclass(frozen=True)
class _Compiled:
    template: object | None  # an llguidance.LLMatcher at the start of the grammar; None when refused
    error: str | None = None


class GrammarCompiler:
    """Compiles :class:`ResponseFormat` s for ``tokenizer`` (a Hugging Face fast tokenizer) and a model of
    ``vocab_size`` logits whose end-of-sequence ids are ``eos_token_ids``. Thread-safe."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: Sequence[int], cache_size: int = 256,
                 timeout_s: float = 5.0, workers: int = 2) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(eos_token_ids)
        self.cache_size = cache_size
        self.timeout_s = timeout_s
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="aspen-grammar")
        self._lock = threading.RLock()  # re-entrant: a future already done runs _store in this thread
        self._cache: OrderedDict[tuple, _Compiled] = OrderedDict()
        self._pending: dict[tuple, Future] = {}
        self._info = None
        self._info_error: str | None = None
        self._counts = {"compiled": 0, "hits": 0, "refused": 0, "timeouts": 0}

    # ------------------------------------------------------------------ public
    def matcher(self, fmt: ResponseFormat) -> GrammarMatcher:
        """A fresh matcher at the start of ``fmt``'s grammar; raises :class:`ResponseFormatError` if ``fmt`` does
        not compile (or not within ``timeout_s``)."""
        compiled = self._compiled(fmt)
        if compiled.error is not None:
            self._count("refused")
            raise ResponseFormatError(fmt.field, compiled.error)
        with self._lock:  # a copy shares the compiled grammar; the template itself never moves
            return GrammarMatcher(compiled.template.deep_copy(), fmt.field, self._info.vocab_size)

    def stats(self) -> CompilerStats:
        with self._lock:
            return CompilerStats(cached=len(self._cache), **self._counts)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ cache
    def _compiled(self, fmt: ResponseFormat) -> _Compiled:
        key = (fmt.kind, fmt.spec)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                self._counts["hits"] += 1
                return hit
            future = self._pending.get(key)
            if future is None:
                future = self._executor.submit(self._compile, fmt)
                self._pending[key] = future
                future.add_done_callback(lambda f, key=key: self._store(key, f))
        try:
            return future.result(timeout=self.timeout_s)
        except FutureTimeout:
            self._count("timeouts")
            log.warning("refused a %s format: not compiled within %.1f s", fmt.kind, self.timeout_s)
            return _Compiled(None, f"compiling the format took longer than {self.timeout_s:g} s; simplify it")

    def _store(self, key: tuple, future: Future) -> None:
        with self._lock:
            self._pending.pop(key, None)
            if future.cancelled() or future.exception() is not None:
                return
            self._cache[key] = future.result()
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    def _count(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1

    # ------------------------------------------------------------------ compiling (worker threads)
    def _compile(self, fmt: ResponseFormat) -> _Compiled:
        self._count("compiled")
        try:
            return _Compiled(self._build(fmt))
        except ResponseFormatError as e:
            return _Compiled(None, e.reason)
        except Exception as e:
            log.warning("grammar engine failed on a %s format", fmt.kind, exc_info=e)
            return _Compiled(None, f"the grammar engine could not compile the format: {short_error(str(e))}")

    def _build(self, fmt: ResponseFormat):
        from llguidance import LLMatcher

        info = self._tokenizer_info(fmt)
        grammar = _grammar_text(fmt)
        template = LLMatcher(info, grammar, log_level=0)
        if template.is_error():
            raise ResponseFormatError(fmt.field, short_error(template.get_error()))
        # the first mask checks that the start state is usable and does the lexer's first work here, not in a step
        row = torch.empty(words_for(info.vocab_size), dtype=torch.int32)
        template.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())
        if template.is_error():
            raise ResponseFormatError(fmt.field, "the grammar engine cannot follow the format from its start (does "
                                                 "any finite output match it?): "
                                                 f"{short_error(template.get_error())}")
        if not bool(row[:words_for(self.vocab_size)].any()):
            raise ResponseFormatError(fmt.field, "no token of this model's vocabulary can start the format")
        return template

    def _tokenizer_info(self, fmt: ResponseFormat):
        with self._lock:
            if self._info is None and self._info_error is None:
                self._info, self._info_error = _make_tokenizer_info(self.tokenizer, self.vocab_size,
                                                                    self.eos_token_ids)
            info, error = self._info, self._info_error
        if error is not None:
            raise ResponseFormatError(fmt.field, error)
        return info


def _make_tokenizer_info(tokenizer, vocab_size: int, eos_token_ids: tuple[int, ...]):
    """(the grammar engine's tokenizer, None), or (None, why this tokenizer cannot be used)."""
    import llguidance.hf

    try:
        n_vocab = max(vocab_size, len(tokenizer))
        eos = list(eos_token_ids) or None
        return llguidance.hf.from_tokenizer(tokenizer, n_vocab=n_vocab, eos_token=eos), None
    except Exception as e:
        log.warning("structured output is unavailable for this tokenizer", exc_info=e)
        return None, f"this model's tokenizer cannot be used for structured output ({type(e).__name__}: {e})"


def _grammar_text(fmt: ResponseFormat) -> str:
    """The llguidance grammar of ``fmt`` (not yet checked: the matcher's construction does that)."""
    from llguidance import LLMatcher

    try:
        if fmt.kind == "json_object":
            return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
        if fmt.kind == "json_schema":
            _check_json(fmt)
            return LLMatcher.grammar_from_json_schema(fmt.spec, defaults=JSON_OPTIONS)
        if fmt.kind == "regex":
            return LLMatcher.grammar_from_regex(fmt.spec)
        if fmt.kind == "grammar":
            return LLMatcher.grammar_from_lark(fmt.spec)
        # one terminal: the alternatives go into the lexer's automaton, not into parser rows (which are capped)
        alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in fmt.spec)
        return LLMatcher.grammar_from_lark(f"start: CHOICE\nCHOICE: {alternatives}")
    except ResponseFormatError:
        raise
    except ValueError as e:  # the grammar engine's own parse of the specification (e.g. JSON nested too deeply)
        raise ResponseFormatError(fmt.field, f"the grammar engine cannot read it: {short_error(str(e))}") from None


def _check_json(fmt: ResponseFormat) -> None:
    try:
        schema = json.loads(fmt.spec)
    except json.JSONDecodeError as e:
        raise ResponseFormatError(fmt.field, f"not valid JSON: {e}") from None
    except RecursionError:
        raise ResponseFormatError(fmt.field, "the schema is nested too deeply") from None
    if not isinstance(schema, (dict, bool)):
        raise ResponseFormatError(fmt.field, f"a JSON Schema is an object or a boolean, got {type(schema).__name__}")
