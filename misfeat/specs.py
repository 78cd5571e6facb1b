"""The one grammar of specs and of lists of specs, parsed here and nowhere else.

A spec names a model, a prompt set or a probe::

    spec    := [prefix ":"] body ["@" options]
    options := option ("," option)*
    option  := key "=" value | word

``organism:chat@seed=7,em_domain=law`` is the plug-in ``organism``, body ``chat``, options
``seed=7`` and ``em_domain=law``; ``/data/run3`` and ``gpt2`` have neither prefix nor options.

A list of specs is separated by commas too. A comma starts a new spec unless the spec before
it has options and the next part is a ``key=value`` option (an identifier, ``=``, a value),
which continues them. So ``organism:chat@seed=7,em_domain=law,organism:em@seed=7`` is two
specs, and ``organism:em@small,gpt2`` is two specs as well. In a list, write bare-word options
first (right after ``@``) or as ``key=value`` (``preset=small``): ``organism:em@seed=1,small``
reads as two specs, ``organism:em`` with ``seed=1`` and a model named ``small``.

An option's value may itself be a spec with options (a reference model of a defence,
``kl:0.1@ref=organism:chat@seed=1,em_domain=law``): by the same rule, the ``key=value``
parts after it continue the inner spec, so write such an option last (bare-word options
before it): its value here is ``organism:chat@seed=1,em_domain=law``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from misfeat.errors import MisfeatError

_OPTION = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*=")


@dataclass(frozen=True)
class Spec:
    """A parsed spec: ``prefix`` (a plug-in name, or empty), ``body`` and ``options``."""

    text: str
    prefix: str
    body: str
    options: tuple[str, ...]

    def option_dict(self, flags_key: str = "") -> dict[str, str]:
        """``key=value`` options as a dict; bare words under ``flags_key`` (last one wins)."""
        out: dict[str, str] = {}
        for option in self.options:
            key, sep, value = option.partition("=")
            if sep:
                out[key] = value
            else:
                out[flags_key] = key
        return out


def parse_spec(text: str) -> Spec:
    """Split ``text`` into prefix, body and options (see the module docstring)."""
    text = str(text).strip()
    if not text:
        raise MisfeatError("an empty spec; give a path, a model name or <plug-in>:<name>[@options]")
    main, _, options = text.partition("@")
    prefix, sep, body = main.partition(":")
    if not sep or not prefix.isidentifier():  # a path or a model name
        prefix, body = "", main
    parts = [o.strip() for o in options.split(",")] if options else []
    if any(not o for o in parts):
        raise MisfeatError(f"spec {text!r}: an empty option (two commas, or a comma at the end)")
    merged: list[str] = []
    for part in parts:  # an option whose value is a spec with options keeps the key=value parts after it
        if merged and "@" in merged[-1] and _OPTION.match(part):
            merged[-1] += "," + part
        else:
            merged.append(part)
    return Spec(text, prefix, body, tuple(merged))


def split_specs(text: str | list[str] | tuple[str, ...]) -> list[str]:
    """A comma-separated list of specs as a list, keeping each spec's options with it.

    A list or tuple (e.g. from a repeated option) is split item by item and flattened."""
    if isinstance(text, (list, tuple)):
        return [spec for item in text for spec in split_specs(item)]
    specs: list[str] = []
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        if specs and "@" in specs[-1] and _OPTION.match(part):
            specs[-1] += "," + part
        else:
            specs.append(part)
    if not specs:
        raise MisfeatError(f"{text!r}: an empty list; give one spec or several separated by commas")
    return specs


def split_values(text: str, kind: type = float, what: str = "numbers") -> list:
    """``"0.5,1,2"`` -> ``[0.5, 1.0, 2.0]``: a comma-separated list of ``kind`` values."""
    try:
        values = [kind(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise MisfeatError(f"{text!r}: expected comma-separated {what}, e.g. 0,2,4") from None
    if not values:
        raise MisfeatError(f"{text!r}: expected comma-separated {what}, e.g. 0,2,4")
    return values
