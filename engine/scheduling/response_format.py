"""What a request's output must look like: a JSON object, a JSON Schema, a regular expression, a Lark grammar or
one of a list of strings (pure Python, no torch, no grammar library).

:class:`ResponseFormat` is an immutable, hashable value that checks only its own shape (its kind, the type and
size of its specification); whether the specification compiles is the engine's to decide
(:mod:`engine.structured.compiler`), once, in ``LLMEngine.add_request``. Every refusal is a
:class:`ResponseFormatError` naming the request field at fault by its path in the wire message
(``response_format.json_schema``, ...), so a front end maps it without parsing messages.

Semantics (the engine implements them): the output matches the format in full, from its first token, when the
request ends with ``eos`` or ``stop`` (the format is complete: nothing more may follow, or the model ended it
where the format allowed). A request cut short by ``max_new_tokens`` or the context (``length``), a stop string
or a stop token id ends where it is cut and need not match.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from engine.scheduling.errors import RequestError

#: The kinds of format, and the request field (path in the wire message) each one's specification is read from.
FIELDS = {
    "json_object": "response_format.json_object",
    "json_schema": "response_format.json_schema",
    "regex": "response_format.regex",
    "grammar": "response_format.grammar",
    "choice": "response_format.choice.choices",
}
#: Longest specification accepted (a JSON Schema's text, a regex, a grammar, all choices together), in
#: characters: a larger one is refused before anything is compiled.
MAX_SPEC_CHARS = 1 << 18
MAX_CHOICES = 4096


class ResponseFormatError(RequestError):
    """A response format is refused: ``field`` is its path (``response_format.regex``, ...), ``reason`` says what
    is wrong and what was expected."""


@dataclass(frozen=True)
class ResponseFormat:
    """One output format. ``kind`` is a key of :data:`FIELDS`; ``spec`` is the JSON Schema as JSON text
    (``json_schema``), the regex (``regex``, matched against the whole output), the Lark grammar (``grammar``,
    rule ``start``), the tuple of allowed outputs (``choice``), or None (``json_object``: any JSON object).

    Build one with the class methods; a JSON Schema may be given as a mapping (serialized with its key order
    kept: properties are generated in the order the schema lists them).
    """

    kind: str
    spec: str | tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in FIELDS:
            raise ResponseFormatError("response_format", f"expected a kind among {sorted(FIELDS)}, got "
                                                         f"{self.kind!r:.80}")
        field = self.field
        if self.kind == "json_object":
            if self.spec is not None:
                raise ResponseFormatError(field, "json_object takes no specification")
            return
        if self.kind == "choice":
            self._check_choices(field)
            return
        if not isinstance(self.spec, str):
            raise ResponseFormatError(field, f"expected a string, got {type(self.spec).__name__}")
        if not self.spec.strip():
            raise ResponseFormatError(field, "the specification is empty")
        if len(self.spec) > MAX_SPEC_CHARS:
            raise ResponseFormatError(field, f"{len(self.spec)} characters; expected at most {MAX_SPEC_CHARS}")

    def _check_choices(self, field: str) -> None:
        spec: Any = self.spec
        if isinstance(spec, (str, bytes)) or not isinstance(spec, Iterable):
            raise ResponseFormatError(field, f"expected a list of strings, got {type(spec).__name__}")
        choices = tuple(spec)
        object.__setattr__(self, "spec", choices)
        if not choices or len(choices) > MAX_CHOICES:
            raise ResponseFormatError(field, f"expected 1 to {MAX_CHOICES} choices, got {len(choices)}")
        bad = [c for c in choices if not isinstance(c, str) or not c]
        if bad:
            raise ResponseFormatError(field, f"expected non-empty strings, got {bad[0]!r:.80}")
        total = sum(len(c) for c in choices)
        if total > MAX_SPEC_CHARS:
            raise ResponseFormatError(field, f"{total} characters in all; expected at most {MAX_SPEC_CHARS}")

    # ------------------------------------------------------------------ constructors
    @classmethod
    def json_object(cls) -> ResponseFormat:
        """Any JSON object."""
        return cls("json_object")

    @classmethod
    def json_schema(cls, schema: str | Mapping[str, Any] | bool) -> ResponseFormat:
        """A JSON value valid against ``schema`` (JSON text, or a mapping / bool serialized here)."""
        if not isinstance(schema, str):
            try:
                schema = json.dumps(schema, ensure_ascii=False, allow_nan=False)
            except (TypeError, ValueError, RecursionError) as e:
                raise ResponseFormatError(FIELDS["json_schema"], f"the schema is not JSON-serializable: "
                                                                 f"{e}") from None
        return cls("json_schema", schema)

    @classmethod
    def regex(cls, pattern: str) -> ResponseFormat:
        """Text that the regular expression ``pattern`` matches in full (Rust ``regex`` syntax, no look-around)."""
        return cls("regex", pattern)

    @classmethod
    def grammar(cls, lark: str) -> ResponseFormat:
        """Text of the Lark grammar ``lark`` (start rule ``start``)."""
        return cls("grammar", lark)

    @classmethod
    def choice(cls, choices: Iterable[str]) -> ResponseFormat:
        """Exactly one of ``choices``."""
        return cls("choice", tuple(choices) if not isinstance(choices, (str, bytes)) else choices)

    # ------------------------------------------------------------------ queries
    @property
    def field(self) -> str:
        """The request field (path in the wire message) of this format's specification."""
        return FIELDS[self.kind]

    def __repr__(self) -> str:
        spec = self.spec if not isinstance(self.spec, str) or len(self.spec) <= 60 else self.spec[:57] + "..."
        return f"ResponseFormat({self.kind!r}, {spec!r})"
