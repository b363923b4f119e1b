"""Command-line flags generated from dataclass fields and their :class:`~engine.config.Setting`.

:func:`add_arguments` adds one flag per field of a dataclass, with the field's default, help, choices and unit
(a field whose type is itself a dataclass contributes that dataclass's fields, in the ``--help`` section its own
Setting names); :func:`from_args` builds the dataclass back from the parsed arguments. A bool field becomes a
switch that flips its default: ``--name`` when it defaults to False, ``--no-name`` when it defaults to True.
"""
from __future__ import annotations

import argparse
import dataclasses

from engine.config import UNITS, Setting, field_types, setting_of


def add_arguments(parser: argparse.ArgumentParser, cls: type,
                  section: str = "options") -> dict[str, argparse._ArgumentGroup]:
    """Add a flag for every command-line field of the dataclass ``cls``; returns the ``--help`` sections by
    title (fields without a section of their own go in ``section``), so a caller can add its own flags there."""
    sections: dict[str, argparse._ArgumentGroup] = {}
    _add(parser, cls, section, sections, set())
    return sections


def from_args(cls: type, args: argparse.Namespace, **given):
    """An instance of the dataclass ``cls`` from arguments parsed with :func:`add_arguments`'s flags (values
    converted back from their flag units); ``given`` sets fields directly (those without a flag, for one)."""
    kinds = field_types(cls)
    values = {}
    for f in dataclasses.fields(cls):
        s = setting_of(f)
        kind, _ = kinds[f.name]
        if f.name in given:
            values[f.name] = given[f.name]
        elif s.cli and dataclasses.is_dataclass(kind):
            values[f.name] = from_args(kind, args)
        elif s.cli:
            value = getattr(args, f.name)
            values[f.name] = value * UNITS[s.unit] if s.unit and value is not None else value
    return cls(**values)


def flag_of(f: dataclasses.Field, s: Setting) -> str:
    """The flag of field ``f``: its Setting's, else derived from its name (``--no-`` for a True bool)."""
    if s.flag:
        return s.flag
    negated = f.default is True
    return ("--no-" if negated else "--") + f.name.replace("_", "-")


def _add(parser: argparse.ArgumentParser, cls: type, section: str, sections: dict, dests: set[str]) -> None:
    kinds = field_types(cls)
    for f in dataclasses.fields(cls):
        s = setting_of(f)
        if not s.cli:
            continue
        kind, _ = kinds[f.name]
        title = s.group or section
        if dataclasses.is_dataclass(kind):
            _add(parser, kind, title, sections, dests)
            continue
        if f.name in dests:  # one namespace holds every flag's value, by field name
            raise ValueError(f"{cls.__name__}.{f.name}: another field already has a flag for {f.name!r}")
        dests.add(f.name)
        if title not in sections:
            sections[title] = parser.add_argument_group(title)
        group, flag = sections[title], flag_of(f, s)
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if kind is bool:
            group.add_argument(flag, dest=f.name, action="store_false" if default else "store_true",
                               default=default, help=("turn off " if default else "turn on ") + s.help)
            continue
        shown = _in_unit(default, s.unit)
        text = s.help + (f", in {s.unit}" if s.unit else "") + ("" if shown is None else f" (default: {shown})")
        metavar = None if s.choices else s.unit or ("N" if kind is int else flag.lstrip("-").replace("-", "_").upper())
        group.add_argument(flag, dest=f.name, type=kind, default=shown, choices=s.choices or None,
                           metavar=metavar, help=text.replace("%", "%%"))


def _in_unit(value, unit: str | None):
    if value is None or unit is None:
        return value
    scale = UNITS[unit]
    return value // scale if value % scale == 0 else value / scale
