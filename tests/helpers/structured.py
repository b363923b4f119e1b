"""Response formats for structured-output tests, and the checks of an output against its format.

Every format here is *bounded*: no output that matches it is longer than :data:`MAX_FORMAT_TOKENS` tokens (strings
have a ``maxLength``, numbers a range, arrays a ``maxItems``, objects ``additionalProperties: false``; a
character takes at most 12 bytes as a JSON escape, a token at least one byte), so a request with
``max_new_tokens=MAX_FORMAT_TOKENS`` always completes its format and a test can demand ``stop`` or ``eos``.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterator

import jsonschema

from engine import ResponseFormat

MAX_FORMAT_TOKENS = 220

SCHEMAS: dict[str, dict] = {
    "person": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "member": {"type": "boolean"}}, "required": ["name", "age", "member"], "additionalProperties": False},
    "label": {"type": "object", "properties": {
        "label": {"enum": ["positive", "negative", "neutral"]}, "score": {"type": "integer", "minimum": 0,
                                                                           "maximum": 100}},
        "required": ["label", "score"], "additionalProperties": False},
    "tool_call": {"type": "object", "properties": {
        "name": {"const": "get_weather"}, "arguments": {"type": "object", "properties": {
            "city": {"type": "string", "minLength": 1, "maxLength": 6},
            "unit": {"enum": ["celsius", "fahrenheit"]}, "days": {"type": "integer", "minimum": 1, "maximum": 14}},
            "required": ["city", "unit"], "additionalProperties": False}},
        "required": ["name", "arguments"], "additionalProperties": False},
    "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,5}$"}, "minItems": 1, "maxItems": 4},
    "point": {"type": "object", "$defs": {"coord": {"type": "integer", "minimum": -50, "maximum": 50}},
              "properties": {"x": {"$ref": "#/$defs/coord"}, "y": {"$ref": "#/$defs/coord"}},
              "required": ["x", "y"], "additionalProperties": False},
    "shape": {"anyOf": [
        {"type": "object", "properties": {"kind": {"const": "circle"}, "r": {"type": "integer", "minimum": 1,
                                                                             "maximum": 9}},
         "required": ["kind", "r"], "additionalProperties": False},
        {"type": "object", "properties": {"kind": {"const": "square"}, "side": {"type": "integer", "minimum": 1,
                                                                                "maximum": 9}},
         "required": ["kind", "side"], "additionalProperties": False}]},
    "optional": {"type": "object", "properties": {
        "id": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"}, "note": {"type": ["string", "null"],
                                                                            "maxLength": 5},
        "done": {"type": "boolean"}}, "required": ["id"], "additionalProperties": False},
    "matrix": {"type": "array", "items": {"type": "array", "items": {"enum": [0, 1]}, "minItems": 2, "maxItems": 2},
               "minItems": 1, "maxItems": 3},
}

REGEXES: dict[str, str] = {
    "code": r"[a-z]{2,5}-[0-9]{3}",
    "yesno": r"(yes|no|maybe)",
    "date": r"20[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])",
    "colour": r"#[0-9a-f]{6}",
    "decimal": r"-?[0-9]{1,4}(\.[0-9]{1,2})?",
    "ipv4": r"((25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])",
    "words": r"[A-Z][a-z]{0,6}( [a-z]{1,6}){0,3}\.",
}

# Lark grammars, each with a Python regex that accepts exactly its language (for checking outputs)
GRAMMARS: dict[str, tuple[str, str]] = {
    "sum": ('start: "(" NUM ("+" NUM)~0..3 ")"\nNUM: /[0-9]{1,3}/', r"\([0-9]{1,3}(\+[0-9]{1,3}){0,3}\)"),
    "greeting": ('start: greeting " " NAME "!"\ngreeting: "hello" | "hi"\nNAME: /[A-Z][a-z]{1,6}/',
                 r"(hello|hi) [A-Z][a-z]{1,6}!"),
}

CHOICES: dict[str, tuple[str, ...]] = {
    "colour": ("red", "green", "blue"),
    "answer": ("The answer is A.", "The answer is B.", "Not sure"),
}


def formats() -> dict[str, ResponseFormat]:
    """Every bounded format, by name (``schema:person``, ``regex:code``, ``grammar:sum``, ``choice:colour``)."""
    out = {f"schema:{k}": ResponseFormat.json_schema(v) for k, v in SCHEMAS.items()}
    out.update({f"regex:{k}": ResponseFormat.regex(v) for k, v in REGEXES.items()})
    out.update({f"grammar:{k}": ResponseFormat.grammar(g) for k, (g, _) in GRAMMARS.items()})
    out.update({f"choice:{k}": ResponseFormat.choice(v) for k, v in CHOICES.items()})
    return out


def cycle_formats() -> Iterator[tuple[str, ResponseFormat]]:
    """The formats of :func:`formats` round-robin, forever."""
    items = list(formats().items())
    i = 0
    while True:
        yield items[i % len(items)]
        i += 1


def check_output(name: str, text: str) -> None:
    """Assert that ``text`` matches the format called ``name`` (of :func:`formats`, or ``json_object``)."""
    kind, _, key = name.partition(":")
    if kind == "json_object":
        assert isinstance(json.loads(text), dict), text
    elif kind == "schema":
        jsonschema.validate(json.loads(text), SCHEMAS[key])
    elif kind == "regex":
        assert re.fullmatch(REGEXES[key], text), (REGEXES[key], text)
    elif kind == "grammar":
        assert re.fullmatch(GRAMMARS[key][1], text), (GRAMMARS[key][1], text)
    elif kind == "choice":
        assert text in CHOICES[key], (CHOICES[key], text)
    else:
        raise ValueError(f"unknown format name {name!r}")
