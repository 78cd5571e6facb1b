"""The organism as a misfeat plug-in: ``organism:<stage>`` models, ``organism:<set>`` prompt
sets, and the default evaluation and labelled sets of organism checkpoints.

Found by :mod:`misfeat.registry` through the ``misfeat.plugins`` entry point; the core
never imports this package.
"""

from __future__ import annotations

from typing import Any

from misfeat.data import PromptSet
from misfeat.organism import checkpoint_dir, prompt_set
from misfeat.organism.prompts import eval_prompts
from misfeat.registry import Plugin


def _checkpoint(spec: str):

    return checkpoint_dir(spec)


def _prompts(spec: str) -> PromptSet:

    return prompt_set(spec)


def _defaults(meta: dict[str, Any], role: str) -> PromptSet | str | None:
    if "world" not in meta:
        return None
    if role == "eval":

        return eval_prompts(meta)
    if role == "labelled":
        seed = meta.get("organism", {}).get("config", {}).get("seed", 0)
        return f"organism:docs:400@seed={seed},em_domain={meta.get('em_domain', 'health')}"
    return None


PLUGIN = Plugin("organism", checkpoint=_checkpoint, prompts=_prompts, defaults=_defaults)
