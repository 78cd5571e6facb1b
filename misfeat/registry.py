"""Plug-ins: model specs, prompt-set specs and default prompt sets that the core does not know.

The core (models, data, evaluate, features, ...) knows local directories, JSONL files and
model names. Everything else comes from a :class:`Plugin`, registered under a spec prefix:
``load_model("organism:chat")`` asks the plug-in named ``organism`` for the checkpoint
directory of ``organism:chat``, ``load_prompts("organism:heldout")`` asks it for the prompt
set, and ``evaluate(model)`` without prompts asks the plug-in that claims the model's
checkpoint metadata (metadata with a key named like the plug-in) for its default set.

The core never imports a plug-in. Plug-ins are found, on first use of their prefix, in
this order: registered in this process with :func:`register`; the ``misfeat.plugins``
entry-point group (``name = "package.module:PLUGIN"`` in a package's ``pyproject.toml``);
the built-in table below (the package's own organism, for source checkouts whose installed
metadata predates the entry point). A user's benchmark plugs in the same way::

    from misfeat.registry import Plugin, register
    register(Plugin("mybench", prompts=lambda spec: read_jsonl(...)))
    load_prompts("mybench:hard")

Prompt sets carry their evaluation grouping in ``meta``: ``meta["groups"]`` maps a group
name to its domains and ``meta["headline"]`` names the group a one-number summary reports
(:attr:`misfeat.evaluate.EvalReport.headline`); ``meta["contrast"]`` names the positive and
negative labels of a labelled text set (used for AUROCs and contrastive directions).
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from misfeat.errors import MisfeatError
from misfeat.specs import parse_spec

if TYPE_CHECKING:
    from misfeat.data import PromptSet

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "misfeat.plugins"
ROLES = ("eval", "labelled")
"""what a default prompt set is for: ``eval`` (scored, with groups and reference answers) or
``labelled`` (texts labelled with the two labels of ``meta['contrast']``)"""

# name -> "module:attribute"; only used when the entry point is not installed
_BUILTIN = {"organism": "misfeat.organism.plugin:PLUGIN"}

_PLUGINS: dict[str, Plugin] = {}


@dataclass(frozen=True)
class Plugin:
    """What a plug-in provides; every part is optional."""

    name: str
    """the spec prefix it answers (``<name>:<body>``), and the checkpoint-metadata key it claims"""
    checkpoint: Callable[[str], Path] | None = None
    """model spec -> a misfeat checkpoint directory (built on first use if need be)"""
    prompts: Callable[[str], PromptSet] | None = None
    """prompt-set spec -> the prompt set"""
    defaults: Callable[[dict[str, Any], str], PromptSet | str | None] | None = None
    """(checkpoint metadata, role in ROLES) -> the default prompt set of that role, or None"""


def register(plugin: Plugin) -> Plugin:
    """Make ``plugin`` answer its prefix in this process (replacing any earlier one)."""
    if not plugin.name or ":" in plugin.name or "@" in plugin.name or "," in plugin.name:
        raise MisfeatError(f"plug-in name {plugin.name!r} must be non-empty, without ':', '@' or ','")
    _PLUGINS[plugin.name] = plugin
    return plugin


def known_names() -> list[str]:
    """Names of every plug-in that can be found (registered, installed or built in)."""
    return sorted(set(_PLUGINS) | set(_entry_points()) | set(_BUILTIN))


def find(name: str) -> Plugin | None:
    """The plug-in called ``name``, loading it on first use; None if there is none."""
    if name in _PLUGINS:
        return _PLUGINS[name]
    target = _entry_points().get(name) or _BUILTIN.get(name)
    if target is None:
        return None
    module, _, attr = target.partition(":")
    plugin = getattr(importlib.import_module(module), attr or "PLUGIN")
    if not isinstance(plugin, Plugin) or plugin.name != name:
        raise MisfeatError(f"plug-in entry {name} = {target!r} is not a misfeat.registry.Plugin named {name!r}")
    logger.debug("loaded plug-in %s from %s", name, target)
    return register(plugin)


def for_spec(spec: str) -> Plugin | None:
    """The plug-in answering ``spec`` (``<name>:<body>``), or None for paths and model names."""
    if not str(spec).strip():
        return None
    prefix = parse_spec(str(spec)).prefix
    return find(prefix) if prefix else None


def for_meta(meta: dict[str, Any]) -> Plugin | None:
    """The plug-in that claims a checkpoint's metadata (a top-level key with its name)."""
    for name in known_names():
        if name in meta:
            return find(name)
    return None


def default_prompts(meta: dict[str, Any], role: str = "eval") -> PromptSet | str | None:
    """The default prompt set of ``role`` for a checkpoint with ``meta``; None if no plug-in has one."""
    if role not in ROLES:
        raise MisfeatError(f"unknown prompt-set role {role!r}; use one of {', '.join(ROLES)}")
    plugin = for_meta(meta)
    if plugin is None or plugin.defaults is None:
        return None
    return plugin.defaults(meta, role)


@functools.lru_cache(maxsize=1)
def _entry_points() -> dict[str, str]:
    from importlib.metadata import entry_points

    try:
        return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    except Exception as err:  # broken metadata of an unrelated package must not break misfeat
        logger.debug("could not read entry points: %s", err)
        return {}
