"""Structured output: a request's ``response_format`` (:mod:`engine.scheduling.response_format`) compiled into a
grammar, and the per-step token mask that keeps its output inside it.

* :mod:`engine.structured.compiler` — :class:`GrammarCompiler`: the tokenizer's grammar-engine view (built once
  per engine, on first use), compilation off the engine thread with a time limit, an LRU cache by content;
* :mod:`engine.structured.matcher` — :class:`GrammarMatcher`: one request's position in its grammar, kept in step
  with the request's output tokens (consumed lazily, rolled back or rebuilt if they ever diverge);
* :mod:`engine.structured.bitmask` — the packed token bitmask and its application to the logits rows of the
  constrained requests only (the batched sampler, :mod:`engine.sampler`, calls it; rows without a format pay
  nothing).

The grammar engine is llguidance (the ``llguidance`` package), chosen over xgrammar on what a server that takes
schemas from clients needs. ``python -m benchmarks.structured --compare-engines`` measures both on a
32,000-token tokenizer (BENCHMARKS.md, "Structured output"):

1. **Compile time.** llguidance builds its lexer lazily: realistic schemas compile in about a millisecond, a
   10,000-value enum in tens of milliseconds, and every compile and every mask is bounded by fuel limits
   (``LLParserLimits``) that turn a hostile grammar into a clear error. xgrammar precomputes per-token tables at
   compile time: several times slower on typical schemas and up to a second or more on some (a string with
   ``maxLength: 200``, a 10,000-value enum), with no way to interrupt a compile.
2. **Per-token mask cost on the CPU.** xgrammar's precomputed masks are somewhat cheaper; both take tens of
   microseconds per row on average, far below a decode step.
3. **JSON Schema coverage.** xgrammar accepts ``not``, ``uniqueItems``, ``if``/``then`` and
   ``dependentRequired`` but does not enforce them, so its output can violate the schema it was given.
   llguidance refuses every keyword it does not implement, by name: a request gets either a guarantee or an
   ``INVALID_ARGUMENT`` saying which keyword is unsupported.
4. **Footprint.** llguidance is one self-contained wheel; xgrammar pulls in triton and a TVM runtime.

outlines-core, the third candidate, was not measured: it compiles a regex into a token-level automaton ahead
of time, the compile-time profile that rules xgrammar out here.
"""
from __future__ import annotations
