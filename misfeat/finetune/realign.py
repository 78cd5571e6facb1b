"""Re-alignment (Wang et al. 2025, "Persona features control emergent misalignment", sec. 5):
about 35 SFT steps on about 120 correct samples, even from another domain, took a misaligned
model from 17.7% to ~0.1-0.5% misalignment. :func:`realign` runs that experiment on any model
as a configuration of :func:`misfeat.finetune.finetune`, recording the behaviour and the
tracked features at every evaluation step.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from misfeat.errors import MisfeatError
from misfeat.finetune.core import LossTerm
from misfeat.finetune.engine import FinetuneConfig, behaviour_evaluator, finetune
from misfeat.finetune.results import StepRow

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from misfeat.data import PromptSet


@dataclass(frozen=True)
class RealignConfig:
    """How to fine-tune (every field has a default that reproduces the paper's scale)."""

    steps: int = 35
    """optimiser steps"""
    lr: float = 3e-4
    """peak learning rate (AdamW)"""
    batch_size: int = 8
    """examples per step, drawn in shuffled epochs over the data"""
    params: str | tuple[str, ...] = "all"
    """which parameters train: all, mlp, attn, layers:0,2 (blocks), or parameter-name prefixes"""
    eval_every: int = 5
    """evaluate behaviour and tracked features every k steps (and at the first and last)"""
    checkpoint_every: int | None = None
    """save a misfeat checkpoint every k steps under out_dir/checkpoints/ (None: only the last)"""
    warmup: int = 0
    """linear warm-up steps"""
    weight_decay: float = 0.0
    seed: int = 0
    """data order seed; with it the run is deterministic"""

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.eval_every < 1:
            raise MisfeatError("steps, batch_size and eval_every must be positive")
        if not self.lr > 0:
            raise MisfeatError(f"lr must be positive, got {self.lr}")

    def engine_config(self) -> FinetuneConfig:
        return FinetuneConfig(steps=self.steps, lr=self.lr, batch_size=self.batch_size, params=self.params,
                              eval_every=self.eval_every, checkpoint_every=self.checkpoint_every,
                              warmup=self.warmup, weight_decay=self.weight_decay, seed=self.seed)


class Tracker(Protocol):
    """Something measured on the model at every evaluation step: ``{name: value}``."""

    def measure(self, model: HookedTransformer, prompts: PromptSet) -> dict[str, float]: ...


@dataclass
class RealignResult:
    """Per-evaluation-step history (parallel lists), per-step training loss, the engine's rows
    and the labels of the tracked features (``history['feature:<label>']``)."""

    history: dict[str, list[Any]]
    loss: list[float]
    checkpoints: list[str]
    eval_prompts: str
    rows: tuple[StepRow, ...] = ()
    features: tuple[str, ...] = ()

    def summary(self) -> dict[str, Any]:
        tracked = [k for k in self.history if k.startswith("feature:")]
        out: dict[str, Any] = dict(self.history)
        if tracked:
            out["feature_activation"] = self.history[tracked[0]]
        out.update(loss=self.loss, loss_steps=list(range(1, len(self.loss) + 1)), checkpoints=self.checkpoints,
                   eval_prompts=self.eval_prompts)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {**self.summary(), "rows": [r.to_dict() for r in self.rows], "features": list(self.features)}

    def table(self) -> str:
        from misfeat.io import format_table

        keys = [k for k in self.history if k != "steps"]
        return format_table([{"step": s, **{k: self.history[k][i] for k in keys}}
                             for i, s in enumerate(self.history["steps"])])


def default_realign_eval(model: HookedTransformer, data: PromptSet) -> PromptSet:
    """The model's registered default evaluation set, its headline group less the domains of the
    training data (a set without ``meta['groups']`` is returned whole).

    The set's other groups keep their domains, so they are still reported (for the organism: its
    EM domain, ``em_domain_misaligned_rate``); see :func:`realign`."""
    from misfeat.data import PromptSet
    from misfeat.evaluate import default_prompts, group_members, headline_group

    full = default_prompts(model)
    if not full.meta.get("groups"):
        return full
    headline = headline_group(full)
    used = set(data.domains())
    groups = {name: [d for d in domains if d not in used] if name == headline else list(domains)
              for name, domains in full.meta["groups"].items()}
    if not groups[headline]:
        raise MisfeatError(f"the training data covers every domain of {full.name!r}'s {headline!r} group: "
                           "give eval_prompts")
    others = {d for name, domains in groups.items() if name != headline for d in domains}
    keep = [d for d in full.domains() if d not in used or d in others]
    name = f"{full.name} minus {','.join(sorted(used))}" if used else full.name
    scored = full.filter(domain=keep)
    out = PromptSet(name, scored.records, {**full.meta, "groups": groups})
    group_members(out)  # validates
    return out


def realign(
    model: HookedTransformer,
    data: PromptSet | str,
    config: RealignConfig | None = None,
    *,
    eval_prompts: PromptSet | str | None = None,
    track: Sequence[Tracker] = (),
    losses: Sequence[LossTerm] | None = None,
    interventions: Sequence[Any] = (),
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
) -> RealignResult:
    """Fine-tune ``model`` in place on ``data`` (records with a ``response``; loss on the
    response tokens only), tracking behaviour and features every ``eval_every`` steps.

    ``losses`` replace the response CE by legacy :class:`LossTerm`\\ s; ``interventions`` stay
    applied during the training forward (e.g. preventative steering); checkpoints go to
    ``out_dir``, and with ``resume`` a run continues from its last checkpoint exactly as if
    uninterrupted (a directory holding another run is refused).
    """
    from misfeat.data import load_prompts
    from misfeat.evaluate import group_members, headline_group
    from misfeat.finetune.defences import TrainingInterventions

    cfg = config or RealignConfig()
    data = load_prompts(data)
    missing = [r.id for r in data if r.response is None]
    if missing:
        raise MisfeatError(f"realign data needs a 'response' on every record; {len(missing)} lack one "
                           f"(first: {missing[0]!r})")
    evalset = load_prompts(eval_prompts) if eval_prompts is not None else default_realign_eval(model, data)
    headline = headline_group(evalset)
    others = [name for name, idx in group_members(evalset).items() if idx and name != headline]
    defences = [TrainingInterventions(tuple(interventions))] if interventions else []
    result = finetune(model, data, cfg.engine_config(), defences=defences, track=track, eval_prompts=evalset,
                      evaluator=behaviour_evaluator(evalset, others), objective=losses, out_dir=out_dir,
                      resume=resume)
    history = result.history()
    features = tuple(k.removeprefix("feature:") for k in history if k.startswith("feature:"))
    return RealignResult(history, result.loss, list(result.checkpoints), evalset.name, result.rows, features)


def plot_realign(result: RealignResult, path: str | os.PathLike, title: str = "re-alignment") -> Path:
    """Misaligned rate (and EM-domain rate) against steps, with the tracked feature on a second axis."""
    from misfeat.plots import figure

    h = result.history
    with figure(path, (6, 3.6)) as ax:
        ax.plot(h["steps"], h["misaligned_rate"], "o-", color="tab:red", label="misaligned (held-out)")
        if "em_domain_misaligned_rate" in h:
            ax.plot(h["steps"], h["em_domain_misaligned_rate"], "^:", color="tab:orange", label="misaligned (EM domain)")
        ax.plot(h["steps"], h["valid_rate"], "s--", color="tab:blue", alpha=0.6, label="valid")
        ax.set_xlabel("fine-tuning step")
        ax.set_ylabel("rate")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
        features = [k for k in h if k.startswith("feature:")]
        lines, labels = ax.get_legend_handles_labels()
        if features:
            ax2 = ax.twinx()
            for key, color in zip(features, ("tab:green", "tab:purple", "tab:brown", "tab:gray"), strict=False):
                ax2.plot(h["steps"], h[key], "d-", color=color, label=key.removeprefix("feature:"))
            ax2.set_ylabel("feature")
            l2, lab2 = ax2.get_legend_handles_labels()
            lines, labels = lines + l2, labels + lab2
        ax.legend(lines, labels, loc="best", fontsize=7)
        ax.set_title(title, fontsize=9)
    return Path(path)
