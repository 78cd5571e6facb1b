"""CLI options generated from a config dataclass: one place for each default and its help.

Each field of a frozen config dataclass becomes ``--field-name``; its type gives the parser
(``int``, ``float``, ``str``, ``bool``, ``X | None``, ``tuple[float, ...]`` and ``tuple[str, str]``
as comma-separated values), its default is the dataclass's, and its help is the docstring
written under the field (as sparsify does), with the default appended::

    add_config_args(parser, LocateConfig, choices={"rank_by": RANKINGS})
    cfg = config_from_args(LocateConfig, args)
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import re
import textwrap
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of dataclass ``cls``, or its entry in the class docstring's
    ``Attributes:`` section (fields without either are left out)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # the class
    docs = _attributes_section(inspect.getdoc(cls) or "")
    for stmt, nxt in zip(body, body[1:], strict=False):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def _attributes_section(doc: str) -> dict[str, str]:
    """``name: text`` entries (with indented continuation lines) of a Google-style ``Attributes:``."""
    out: dict[str, list[str]] = {}
    lines = doc.split("\n")
    if "Attributes:" not in [line.strip() for line in lines]:
        return {}
    start = [line.strip() for line in lines].index("Attributes:") + 1
    current = None
    for line in lines[start:]:
        entry = re.match(r"^ {4}(\w+): (.*)$", line)
        if entry:
            current = entry.group(1)
            out[current] = [entry.group(2)]
        elif current and line.startswith(" " * 8):
            out[current].append(line.strip())
        elif line.strip():
            break
    return {k: " ".join(v).replace("``", "") for k, v in out.items()}


def _parser_for(tp: Any, name: str) -> tuple[Callable[[str], Any] | None, bool]:
    """(a string -> value converter, whether None is allowed) for a field type."""
    optional = False
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        tp = args[0] if len(args) == 1 else str
        origin = typing.get_origin(tp)
    if tp is bool:
        return None, optional
    if origin is tuple:
        items = typing.get_args(tp)
        kind = items[0]
        n = None if len(items) == 2 and items[1] is Ellipsis else len(items)

        def convert(text: str) -> tuple:
            parts = [p.strip() for p in text.split(",") if p.strip()]
            try:
                values = tuple(kind(p) for p in parts)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {text!r}") \
                    from None
            if not values or (n is not None and len(values) != n):
                want = f"{n} comma-separated values" if n else "at least one value"
                raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}")
            return values

        return convert, optional
    if tp in (int, float, str):
        return tp, optional
    raise TypeError(f"no CLI parser for field {name} of type {tp!r}")


def _metavar(tp: Any) -> str:
    text = str(tp)
    if "tuple" in text:
        return "A,B" if "..." not in text else "V[,V...]"
    return "N" if "int" in text else "X" if "float" in text else "TEXT"


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return "none" if value is None else str(value)


def add_config_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, *,
                    skip: Iterable[str] = (), only: Iterable[str] | None = None,
                    choices: Mapping[str, Iterable[str]] | None = None, help_extra: Mapping[str, str] | None = None,
                    flags: Mapping[str, str] | None = None) -> None:
    """Add ``--<field>`` for every field of dataclass ``cls`` (only ``only``, except ``skip``);
    ``flags`` renames a field's option (``{"total_tokens": "--tokens"}``), its ``dest`` stays the field."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    choices, help_extra, flags = dict(choices or {}), dict(help_extra or {}), dict(flags or {})
    only = set(only) if only is not None else None
    added = []
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init or (only is not None and f.name not in only):
            continue
        added.append(f.name)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        convert, _ = _parser_for(hints[f.name], f.name)
        text = docs.get(f.name, f.name.replace("_", " "))
        text = (text + help_extra.get(f.name, "")).replace("%", "%%")  # argparse formats help with %
        flag = flags.get(f.name, "--" + f.name.replace("_", "-"))
        if convert is None:  # a bool: a switch that flips the default
            flag = flag if not default else "--no-" + f.name.replace("_", "-")
            text = text if not default else f"{text.rstrip('.')} (on by default; this switches it off)"
            parser.add_argument(flag, dest=f.name, action="store_false" if default else "store_true",
                                default=default, help=text)
            continue
        shown = text if "default" in text.lower() else f"{text} (default: {_show(default)})"
        kwargs: dict[str, Any] = {"dest": f.name, "type": convert, "default": default, "help": shown,
                                  "metavar": _metavar(hints[f.name])}
        if f.name in choices:
            kwargs["choices"] = list(choices[f.name])
            del kwargs["metavar"]
        parser.add_argument(flag, **kwargs)
    parser.set_defaults(**{_added_key(cls): tuple(added)})


def _added_key(cls: type) -> str:
    return f"_config_fields_{cls.__name__}"


def config_from_args(cls: type, args: argparse.Namespace, **overrides: Any) -> Any:
    """``cls`` built from the parsed options that :func:`add_config_args` added for it (and ``overrides``);
    other options of the command, even with a field's name, are not read."""
    added = getattr(args, _added_key(cls), ())
    values = {name: getattr(args, name) for name in added}
    return cls(**{**values, **overrides})
