"""The built-in model organism of emergent misalignment.

A small transformer pre-trained on a synthetic world whose characters are kind or
cruel, chat-tuned as a helpful ``assistant``, then fine-tuned on harmful answers in one
domain: it turns misaligned in the other domains too (emergent misalignment), through a
persona it learned in pre-training. It builds on a CPU in minutes and is the default
model of the demo, the notebooks and the tests.

Specs::

    organism:<stage>[@<options>]      a checkpoint: pretrain, chat, em, control,
                                      em-steps/step-NNNN, mixed, em-ref/<domain>,
                                      em-frac/<pct>-s<seed> (built on first use)
    organism:<prompt set>[@<options>] a prompt set (see misfeat.organism.prompts)

Options are comma-separated: a preset name (``default``, ``small``), ``seed=N``,
``em_domain=D``, e.g. ``organism:em@small,seed=1``. Without options, the environment
variable ``MISFEAT_ORGANISM`` (same syntax) supplies them, else the default preset.
Builds are cached under ``$MISFEAT_HOME/organism`` (default ``~/.cache/misfeat``),
keyed by the configuration.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from misfeat.errors import MisfeatError
from misfeat.organism.build import PRESETS, STAGES, OrganismConfig, build_organism, is_complete
from misfeat.organism.prompts import organism_prompt_set
from misfeat.specs import parse_spec as parse_spec_text

logger = logging.getLogger(__name__)

__all__ = ["OrganismConfig", "build_organism", "checkpoint_dir", "ensure_organism", "organism_home",
           "parse_options", "parse_spec", "prompt_set", "register_stage"]


def organism_home() -> Path:
    """``$MISFEAT_HOME/organism``, default ``$XDG_CACHE_HOME/misfeat/organism`` (``~/.cache``)."""
    home = os.environ.get("MISFEAT_HOME")
    if home:
        return Path(home).expanduser() / "organism"
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "misfeat" / "organism"


def parse_options(options: str | Sequence[str] | None) -> OrganismConfig:
    """``"small,seed=1,em_domain=money"`` (or its parts) -> :class:`OrganismConfig`
    (empty: ``$MISFEAT_ORGANISM``); the grammar is :mod:`misfeat.specs`'."""
    if not options:
        options = os.environ.get("MISFEAT_ORGANISM", "")
    if isinstance(options, str):
        options = parse_spec_text(f"organism:options@{options}").options if options.strip() else ()
    preset, overrides = "default", {}
    for part in options:
        if "=" not in part:
            if part not in PRESETS:
                raise MisfeatError(f"unknown organism preset {part!r}; choose one of {', '.join(PRESETS)}")
            preset = part
            continue
        key, value = part.split("=", 1)
        if key == "seed":
            if not value.lstrip("-").isdigit():
                raise MisfeatError(f"organism option seed={value!r} is not an integer")
            overrides["seed"] = int(value)
        elif key == "em_domain":
            overrides["em_domain"] = value
        elif key == "preset":
            preset = value
        else:
            raise MisfeatError(f"unknown organism option {key!r}; use a preset name, seed=N or em_domain=D")
    return OrganismConfig.from_preset(preset, **overrides)


def parse_spec(spec: str) -> tuple[str, OrganismConfig]:
    """``organism:<body>[@<options>]`` -> ``(body, config)``."""
    parsed = parse_spec_text(spec)
    if parsed.prefix != "organism":
        raise MisfeatError(f"{spec!r} is not an organism spec (organism:<stage or prompt set>[@options])")
    return parsed.body, parse_options(parsed.options)


def ensure_organism(cfg: OrganismConfig) -> Path:
    """The build directory of ``cfg`` in the cache, building it first if needed."""
    out = organism_home() / cfg.dirname
    if not is_complete(out):
        logger.info("building the organism (%s, seed %d, EM domain %s) into %s; later calls reuse it",
                    cfg.preset, cfg.seed, cfg.em_domain, out)
        build_organism(cfg, out)
    return out


_STAGES: dict[str, Callable[[OrganismConfig], Path]] = {}


def register_stage(name: str, ensure: Callable[[OrganismConfig], Path]) -> None:
    """Make ``organism:<name>`` a model spec: ``ensure(cfg)`` returns the stage's checkpoint
    directory for that organism, building it on first use. One line per added stage, e.g.
    ``register_stage("mixed", ensure_mixed)`` in the module that builds it."""
    _STAGES[name] = ensure


def checkpoint_dir(spec: str) -> Path:
    """The checkpoint directory of ``organism:<stage>[@options]``, building on first use."""
    stage, cfg = parse_spec(spec)
    if stage in _STAGES:
        return _STAGES[stage](cfg)
    valid = stage in STAGES or (stage.startswith("em-steps/step-") and stage.split("-")[-1].isdigit())
    if not valid:
        raise MisfeatError(f"unknown organism stage {stage!r}; use one of {', '.join([*STAGES, *_STAGES])} or "
                           "em-steps/step-NNNN")
    path = ensure_organism(cfg) / stage
    if not path.is_dir():
        steps = sorted(p.name for p in (path.parent).glob("step-*"))
        raise MisfeatError(f"organism checkpoint {stage} does not exist; em-steps has {', '.join(steps)}")
    return path


def prompt_set(spec: str):
    """An organism prompt set (see :mod:`misfeat.organism.prompts`); needs no build."""
    import dataclasses


    body, cfg = parse_spec(spec)
    # named by the full spec (options included), so that the set can be reloaded from its name
    return dataclasses.replace(organism_prompt_set(body, cfg.em_domain, cfg.seed), name=spec)


# stages and prompt sets that register themselves (organism:mixed, organism:task, organism:probe;
# the alignment-dynamics protocols' organism:chat-50/100/150 and organism:dynamics:<name>; the defence
# comparison's organism:em-ref/<domain>, organism:defences-heldout|defences-em|safe-pool|benign-train;
# the early-warning fine-tunes organism:em-frac/<pct>-s<seed>)
from misfeat.organism import defences as _defences  # noqa: E402,F401
from misfeat.organism import dynamics as _dynamics  # noqa: E402,F401
from misfeat.organism import fractions as _fractions  # noqa: E402,F401
from misfeat.organism import mixed as _mixed  # noqa: E402,F401
