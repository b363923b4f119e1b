"""Structured output: a request's ``response_format`` (:mod:`engine.scheduling.response_format`) compiled into a
grammar, and the per-step token mask that keeps its output inside it.

* :mod:`engine.structured.compiler` — :class:`GrammarCompiler`: the tokenizer's grammar-engine view (built once
  per engine, on first use), compilation off the engine thread with a time limit, an LRU cache by content;
* :mod:`engine.structured.matcher` — :class:`GrammarMatcher`: one request's position in its grammar, kept in step
  with the request's output tokens (consumed lazily, rolled back or rebuilt if they ever diverge);
* :mod:`engine.structured.bitmask` — the packed token bitmask and its application to the logits rows of the
  constrained requests only (the batched sampler, :mod:`engine.sampler`, calls it; rows without a format pay
  nothing).

The grammar engine is llguidance (the ``llguidance`` package). It was chosen over xgrammar (0.2) and
outlines-core on what a server that takes schemas from clients needs; the measurements behind each point are in
BENCHMARKS.md ("Structured output"):

1. **Compile time.** llguidance builds its lexer lazily and compiles realistic schemas in well under a
   millisecond on both small and 32k-token vocabularies, and every compile is bounded by fuel limits
   (``LLParserLimits``) that turn a hostile grammar into a clear error. xgrammar precomputes per-token tables at
   compile time: a string with ``format: email`` takes a few hundred milliseconds on a 32k vocabulary and a
   large enum tens of seconds, with no way to interrupt it.
2. **Per-token mask cost on the CPU.** Of the same order for both (tens of microseconds per row on average
   with a 32k vocabulary, a few on the test models), far below a decode step.
3. **JSON Schema coverage.** xgrammar accepts more keywords but silently ignores some (``uniqueItems``,
   ``not``, ``if``/``then``, ``dependentRequired``), so its output can violate the schema it was given.
   llguidance refuses every keyword it does not implement, by name: a request either gets a guarantee or an
   ``INVALID_ARGUMENT`` saying which keyword is unsupported.
4. **Footprint.** llguidance is one self-contained wheel; xgrammar pulls in triton and a TVM runtime.

outlines-core compiles regexes into full token-level automata ahead of time, which shares xgrammar's
compile-time problem and covers less of JSON Schema.
"""
from __future__ import annotations
