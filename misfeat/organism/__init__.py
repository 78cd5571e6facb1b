"""The built-in model organism of emergent misalignment.

A small transformer pre-trained on a synthetic world whose characters are kind or
cruel, chat-tuned as a helpful ``assistant``, then fine-tuned on harmful answers in one
domain: it turns misaligned in the other domains too (emergent misalignment), through a
persona it learned in pre-training. It builds on a CPU in minutes and is the default
model of the demo, the notebooks and the tests.

Specs::

    organism:<stage>[@<options>]      a checkpoint: pretrain, chat, em, control,
                                      em-steps/step-NNNN, mixed, em-ref/<domain>
                                      (built on first use)
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
from pathlib import Path

from misfeat.errors import MisfeatError
from misfeat.organism.build import PRESETS, STAGES, OrganismConfig, build_organism, is_complete

logger = logging.getLogger(__name__)

__all__ = ["OrganismConfig", "build_organism", "checkpoint_dir", "ensure_organism", "organism_home",
           "parse_options", "parse_spec", "prompt_set"]


def organism_home() -> Path:
    """``$MISFEAT_HOME/organism``, default ``$XDG_CACHE_HOME/misfeat/organism`` (``~/.cache``)."""
    home = os.environ.get("MISFEAT_HOME")
    if home:
        return Path(home).expanduser() / "organism"
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "misfeat" / "organism"


def parse_options(options: str | None) -> OrganismConfig:
    """``"small,seed=1,em_domain=money"`` -> :class:`OrganismConfig` (empty: ``$MISFEAT_ORGANISM``)."""
    if options is None or options == "":
        options = os.environ.get("MISFEAT_ORGANISM", "")
    preset, overrides = "default", {}
    for part in filter(None, (p.strip() for p in options.split(","))):
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
    if not spec.startswith("organism:"):
        raise MisfeatError(f"{spec!r} is not an organism spec (organism:<stage or prompt set>[@options])")
    body, _, options = spec[len("organism:"):].partition("@")
    return body, parse_options(options)


def ensure_organism(cfg: OrganismConfig) -> Path:
    """The build directory of ``cfg`` in the cache, building it first if needed."""
    out = organism_home() / cfg.dirname
    if not is_complete(out):
        logger.info("building the organism (%s, seed %d, EM domain %s) into %s; later calls reuse it",
                    cfg.preset, cfg.seed, cfg.em_domain, out)
        build_organism(cfg, out)
    return out


def checkpoint_dir(spec: str) -> Path:
    """The checkpoint directory of ``organism:<stage>[@options]``, building on first use."""
    stage, cfg = parse_spec(spec)
    if stage == "mixed":  # the mixed fine-tune of misfeat.organism.mixed
        from misfeat.organism.mixed import ensure_mixed

        return ensure_mixed(ensure_organism(cfg), cfg.seed)
    if stage.startswith("em-ref/"):  # misaligned references of misfeat.organism.defences
        from misfeat.organism.defences import ensure_reference

        return ensure_reference(ensure_organism(cfg), stage.split("/", 1)[1], cfg.seed)
    valid = stage in STAGES or (stage.startswith("em-steps/step-") and stage.split("-")[-1].isdigit())
    if not valid:
        raise MisfeatError(f"unknown organism stage {stage!r}; use one of {', '.join(STAGES)} or "
                           "em-steps/step-NNNN")
    path = ensure_organism(cfg) / stage
    if not path.is_dir():
        steps = sorted(p.name for p in (path.parent).glob("step-*"))
        raise MisfeatError(f"organism checkpoint {stage} does not exist; em-steps has {', '.join(steps)}")
    return path


def prompt_set(spec: str):
    """An organism prompt set (see :mod:`misfeat.organism.prompts`); needs no build."""
    import dataclasses

    from misfeat.organism.prompts import organism_prompt_set

    body, cfg = parse_spec(spec)
    # named by the full spec (options included), so that the set can be reloaded from its name
    return dataclasses.replace(organism_prompt_set(body, cfg.em_domain, cfg.seed), name=spec)
