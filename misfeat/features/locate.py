"""Locate the misalignment feature: the OpenAI recipe as one call, built from stage functions.

0. (with ``adapt_text``) :func:`misfeat.features.stagewise.adapt_to_models`: fine-tune a copy of
   the SAE on the models' activations of a text first (stage-wise model diffing), for an SAE
   that lacks the feature; the stages below then use the adapted SAE;
1. :func:`rank_latents`: cache the SAE hook's activations of the aligned (base) and
   misaligned (fine-tuned) model on the same prompts (row-aligned stores), diff the SAE
   latents (Wang et al. 2025) and attribute the log-prob gap to them -> :class:`Ranking`;
2. :func:`misfeat.features.screen.causal_screen` of the top candidates: steer up in the
   aligned model, down in the misaligned one -> ``ScreenResult``;
3. :func:`choose_feature`: the latent with the largest two-sided effect -> :class:`Choice`;
4. :func:`check_clamp`: clamp it in the misaligned model to the aligned level -> :class:`ClampCheck`;
5. :func:`examples_and_auroc`: its top-activating labelled texts and their AUROC;
6. :func:`group_and_baselines`: the greedy latent group (a split feature as one subspace),
   latent families, the decreases screened up in the misaligned model, and the mean-diff and
   random baselines under the same protocol (see :mod:`misfeat.features.groups`).

Several misaligned models (``finetuned`` a list) are ranked together (the mean activation
increase over them, as Wang et al. 2025 rank over several bad fine-tunes), the top
``screen_each`` of each one's own ranking join the candidates, and they are screened with
their rates averaged; the protocol figures are also reported per model.

:func:`locate` runs them in order and returns a :class:`LocateResult` (``to_dict()`` is the
``summary.json``); :func:`save_locate` writes the direction, examples and plots.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from misfeat import registry
from misfeat.activations import cache_activations, open_store
from misfeat.data import PromptSet, load_prompts
from misfeat.errors import MisfeatError
from misfeat.evaluate import GroupMetrics, evaluate, not_held_out
from misfeat.features.attribution import attribution_scores, gap_gradients, mean_diff_scores
from misfeat.features.diff import LatentDiff, LatentStats, diff_latents
from misfeat.features.directions import Direction, mean_diff, save_direction
from misfeat.features.examples import Examples, separation_auroc, top_examples
from misfeat.features.groups import GROUP_COMBINE, GROUP_SELECT, GROUP_STEER, baseline_directions
from misfeat.features.locate_group import (
    UNIT_NOTE,
    Extras,
    clamp_where,
    group_and_baselines,
    sae_warnings,
)
from misfeat.features.locate_plots import plot_families, plot_ranking, plot_screen
from misfeat.features.screen import ScreenResult, causal_screen
from misfeat.features.stagewise import adapt_to_models, named_models
from misfeat.interventions import Ablate, ClampLatent, save_intervention
from misfeat.models import model_info
from misfeat.sae.io import save_sae
from misfeat.sae.latents import hook_of, path_of
from misfeat.steering import clamp_to_reference

if TYPE_CHECKING:
    import torch
    from sae_lens import SAE
    from transformer_lens import HookedTransformer

    from misfeat.sae.adapt import Adapted

logger = logging.getLogger(__name__)


RANKINGS = ("increase", "attribution", "effect_size", "mean_diff")
CLAMP_POSITIONS = ("all", "last")
"""where locate's clamps may act: every token, or the answer position only"""
ADAPT_WITH = ("both", "finetuned")


@dataclass(frozen=True)
class LocateConfig:
    """Knobs of :func:`locate`; the defaults are what the organism's bar was checked with."""

    screen: int = 10
    """how many top candidates to screen causally (0: skip the screen)"""
    screen_aligned: int = 2
    """also screen this many latents whose decoder rows lie closest to the mean-difference direction (largest
    cosine), whether or not their activation rose: a latent that never fires at the screened positions can still
    write the feature's direction (0: off; on the organism's grid of 72 SAEs, 2 passes at least as many as 0 on
    every kind of SAE, docs/organism.md)"""
    screen_each: int = 10
    """with several misaligned models (--finetuned A,B,C): also screen the top screen_each latents of each model's
    own ranking (the same rank_by, that model's increase and mean-difference direction) not already among the
    candidates, since a latent that rose in one fine-tune gets a fraction of its rise in the averaged ranking while
    the group must cut each model (0: the averaged ranking alone; on the organism's 12 pre-training SAEs with three
    fine-tunes, 10 passes 9 where 0 passes 6, those 6 among them, at ~1.5x the time, docs/organism.md). One
    misaligned model: no effect"""
    top: int = 20
    """rows of the ranked tables in the summary"""
    rank_by: str = "mean_diff"
    """candidate ranking: mean_diff (activation increase x the decoder row's component along the unit
    mean-difference direction; latents that fell score 0), increase (Wang et al.; OpenAI's average
    increase), attribution (gradient x change) or effect_size"""
    positions: str = "last"
    """token positions read and steered: last = the answer position (the last prompt token)"""
    clamp_positions: str = "last"
    """token positions every clamp of locate acts on (the screen's, stage 4's, the single latent's, the group's and
    its saved intervention, the baselines'), always to the base model's mean at the positions read: last (the
    answer position only, the default: the context the model reads is left as the fine-tune made it; in
    generation, the last prompt token) or all (every token; on the organism's grid it cuts more per latent but
    breaks the model sooner, so groups stay smaller, docs/organism.md)"""
    coefs: tuple[float, ...] = (0.5, 1.0, 2.0)
    """screen strengths, in units of the mean residual norm at the SAE's hook (the unit of misfeat steer
    --op add --coefs: 1.0 adds a vector as long as the average activation there)"""
    max_coef: float = 8.0
    """after coefs, steering goes on at twice the largest coefficient tried while the steered model keeps valid >=
    min_valid, up to this (the strongest coherent steering; a fixed grid would cap a weak direction at its top).
    Applies alike to the screen, the single latent, the group, the baselines and the decreases. At or below the
    largest coef: no extension"""
    bisect: int = 2
    """then this many rounds at the midpoint between the strongest valid strength and the weakest invalid one
    above it (e.g. 1 valid, 2 not: 1.5, then 1.25 or 1.75), so that the grid's step does not decide how strong
    the strongest coherent steering is (0: the grid and its extension only)"""
    min_valid: float = 0.8
    """a steered model must keep at least this valid (coherent) rate"""
    min_effect: float = 0.1
    """the misaligned rate must move by at least this much, both ways"""
    examples_prompts: str | None = None
    """labelled texts for top-activating examples and the AUROC (default: the base model's plug-in's
    labelled set, e.g. the organism's documents; else the prompts)"""
    n_examples: int = 10
    """how many top-activating texts to keep"""
    contrast: tuple[str, str] | None = None
    """the positive and negative labels of the examples' texts for the AUROC, e.g. cruel,kind (none:
    the set's own meta['contrast']; without either the AUROC is skipped with a note)"""

    group_cap: int = 8
    """most latents in the greedy group (0: no group); a latent joins only if the group's joint clamp keeps
    the valid rate >= min_valid"""
    group_tol: float = 0.01
    """the group stops growing when a latent cuts the clamped misaligned rate by less than this (group_select both:
    when it adds less than this to the clamp's fall plus the steered rise)"""
    group_steer: str = "best"
    """the group's steering direction: mean_diff (the mean-difference direction projected onto the span of the
    group's decoder rows: the part of the fine-tune's change the group carries, the part its clamp removes),
    increase (the decoder rows weighted by their activation increase: the change as the SAE's activations see it;
    a latent that rarely fires gets no weight), or best (both steered; the one reaching the higher misaligned rate
    at valid >= min_valid is reported, both are in summary.json's group.steering)"""
    group_select: str = "both"
    """how the greedy group grows: both (the two-sided causal effect: each step adds the latent with the largest
    clamp fall plus the rise when the group is steered up in the base model at the strongest of coefs with valid >=
    min_valid; stops when the sum grows by < group_tol; one batched steering call per step) or clamp (the former:
    the joint clamp's fall alone)"""
    group_pursuit: int | None = None
    """matching pursuit for the group: at each greedy step, also offer the group_pursuit latents (per misaligned
    model) whose decoder rows best match (largest absolute cosine) the part of that model's mean-difference vector
    outside the span of the group's decoder rows, besides the screened candidates; summary.json's group.pursued
    lists the group's latents that came so (0: the screened candidates alone). None (the default): 1 with several
    misaligned models (on the organism's 12 seed-1 pre-training SAEs with three fine-tunes, 1 passes every SAE 0
    passes and 3 more, at ~1.5x the CPU time, docs/organism.md), 0 with one (not measured on the one-fine-tune
    grid)"""
    group_combine: str = "worst"
    """with several misaligned models (--finetuned A,B,C), how the group's clamp fall combines over them: worst (the
    smallest relative cut among them, times the mean rate before: a latent joins for the model the group cuts
    least, as the bar asks each to be cut) or mean (the fall of their mean misaligned rate). One misaligned model:
    the two are the same"""
    screen_decreases: int = 5
    """how many of the latents that fell most to steer up in the misaligned model (0: none)"""
    batched: bool = True
    """score every candidate x coefficient of the screen in shared forward passes (off: one evaluation per
    setting, the former code path)"""
    baseline_seed: int = 0
    """seed of the random baseline direction"""
    adapt_text: str | None = None
    """first adapt the SAE to the fine-tune (stage-wise model diffing, Bricken et al. 2024): fine-tune a copy on
    the activations of the models in adapt_with on this text (a prompt-set spec, e.g. the SAE's own training text
    such as organism:aligned:all:600; not the evaluation prompts), then locate in the adapted SAE, saved as
    DIR/sae. For an SAE that lacks the feature (the warning says so). None: use the SAE as it is"""
    adapt_tokens: int = 500_000
    """activation rows the adaptation trains on"""
    adapt_with: str = "both"
    """whose activations the adaptation trains on: both (base and fine-tuned models, equal shares) or finetuned"""

    def __post_init__(self) -> None:
        if self.rank_by not in RANKINGS:
            raise MisfeatError(f"rank_by must be one of {', '.join(RANKINGS)}, not {self.rank_by!r}")
        if self.group_select not in GROUP_SELECT:
            raise MisfeatError(f"group_select must be one of {', '.join(GROUP_SELECT)}, not {self.group_select!r}")
        if self.group_combine not in GROUP_COMBINE:
            raise MisfeatError(f"group_combine must be one of {', '.join(GROUP_COMBINE)}, not {self.group_combine!r}")
        if self.clamp_positions not in CLAMP_POSITIONS:
            raise MisfeatError(f"clamp_positions must be one of {', '.join(CLAMP_POSITIONS)}, not "
                               f"{self.clamp_positions!r}")
        if self.group_steer not in GROUP_STEER:
            raise MisfeatError(f"group_steer must be one of {', '.join(GROUP_STEER)}, not {self.group_steer!r}")
        if not self.coefs or any(not c >= 0 for c in self.coefs):
            raise MisfeatError(f"coefs must be one or more strengths >= 0 (residual norms, e.g. 0.5,1,2), not "
                               f"{self.coefs}")
        if not self.max_coef > 0:
            raise MisfeatError(f"max_coef must be a positive strength (at most max(coefs): no extension), not "
                               f"{self.max_coef}")
        if self.adapt_with not in ADAPT_WITH:
            raise MisfeatError(f"adapt_with must be one of {', '.join(ADAPT_WITH)}, not {self.adapt_with!r}")
        if self.screen_each < 0:
            raise MisfeatError(f"screen_each must be 0 or more (latents per misaligned model), not {self.screen_each}")
        if self.group_pursuit is not None and self.group_pursuit < 0:
            raise MisfeatError(f"group_pursuit must be 0 or more (latents per misaligned model per step), not "
                               f"{self.group_pursuit}")
        if self.screen_aligned < 0:
            raise MisfeatError(f"screen_aligned must be 0 or more (latents to add to the screen), not {self.screen_aligned}")
        if self.bisect < 0:
            raise MisfeatError(f"bisect must be 0 or more (rounds), not {self.bisect}")
        if self.adapt_tokens < 1:
            raise MisfeatError(f"adapt_tokens must be at least 1, not {self.adapt_tokens}")


@dataclass(frozen=True)
class Ranking:
    """Stage 1: the SAE latents ranked by how the fine-tune changed them."""

    diff: LatentDiff
    attribution: torch.Tensor = field(repr=False)
    """per latent: gradient of the log-prob gap x the change (see :mod:`misfeat.features.attribution`)"""
    order: list[int] = field(repr=False)
    """latents by decreasing score (``rank_by``)"""
    rank_by: str
    stores: dict[str, Any] = field(default_factory=dict, repr=False)
    """the activation stores: ``base`` and ``finetuned`` (a list, one per misaligned model)"""
    per_finetuned: list[torch.Tensor] = field(default_factory=list, repr=False)
    """each misaligned model's own increase (their mean is ``diff.increase``)"""
    baselines: dict[str, Direction] = field(default_factory=dict, repr=False)
    """the mean-difference direction (misaligned minus aligned rows) and a random one of its norm"""
    decoder_cosine: torch.Tensor | None = field(default=None, repr=False)
    """per latent: cosine of its decoder row with the mean-difference direction"""
    orders_each: list[list[int]] = field(default_factory=list, repr=False)
    """with several misaligned models: each one's own order (``rank_by`` with its own increase and mean-difference
    direction); empty with one"""
    mean_diffs: list[torch.Tensor] = field(default_factory=list, repr=False)
    """each misaligned model's mean difference at the SAE's hook (misaligned minus aligned rows; their mean is the
    ``mean_diff`` baseline)"""

    def candidates(self, n: int, aligned: int = 0, each: int = 0) -> list[int]:
        """The ``n`` top-ranked latents, then the ``aligned`` latents not among them whose decoder rows have the
        largest cosine with the mean-difference direction, then (several misaligned models) the top ``each`` of
        every model's own order not among them yet."""
        top = list(self.order[:n])
        if aligned and self.decoder_cosine is not None:
            import torch

            by_cosine = [int(i) for i in torch.argsort(self.decoder_cosine, descending=True) if int(i) not in top]
            top += by_cosine[:aligned]
        for order in self.orders_each if each else []:
            top += [i for i in order[:each] if i not in top]
        return top


@dataclass(frozen=True)
class Choice:
    """Stage 3: the chosen latent, whether it passed the screen, and its decoder direction."""

    feature: int
    passed_screen: bool
    direction: Direction = field(repr=False)


@dataclass(frozen=True)
class ClampCheck:
    """Stage 4: the misaligned model with the feature clamped to the aligned model's level."""

    value: dict[str, float]
    """per layer: the base model's mean coordinate along the direction (at the screened positions)"""
    latent_value: float
    """the base model's mean of the SAE latent"""
    group: str
    before: GroupMetrics
    after: GroupMetrics
    """the coordinate along the direction set in every layer's residual stream, at the clamp positions (the answer
    position by default)"""
    after_latent: GroupMetrics
    """the SAE latent set to its base mean, SAE error term kept"""


@dataclass(frozen=True)
class LocateResult:
    """What :func:`locate` found; :meth:`to_dict` is the run's ``summary.json``."""

    config: LocateConfig
    hook: str
    ranking: Ranking
    screen: ScreenResult | None
    choice: Choice
    clamp: ClampCheck
    examples: Examples = field(repr=False)
    auroc: float | None
    auroc_note: str | None
    extras: Extras | None = None
    """stage 6: the group, families, decreases and baselines (None when skipped)"""
    direction_path: Path | None = None
    """where :func:`save_locate` wrote the direction (None until saved)"""
    examples_path: Path | None = None
    group_path: Path | None = None
    """where :func:`save_locate` wrote the group's subspace clamp"""
    warnings: list[str] = field(default_factory=list)
    """e.g. the SAE's features fail the protocol where the mean-diff baseline passes (:func:`sae_warnings`)"""
    adapted: Adapted | None = field(default=None, repr=False)
    """stage 0: the SAE adapted to the fine-tune (``adapt_text``), whose latents the rest ranks"""
    adapted_summary: dict[str, Any] | None = None

    @property
    def feature(self) -> int:
        return self.choice.feature

    @property
    def summary(self) -> dict[str, Any]:
        return self.to_dict()

    def row(self, latent: int) -> dict[str, Any]:
        """The ranking row of ``latent``: its change, attribution and (if screened) screen results."""
        r = {**self.ranking.diff.row(latent), "attribution": float(self.ranking.attribution[latent])}
        if self.adapted is not None:
            r["decoder_cosine_to_original"] = float(self.adapted.decoder_cosine[latent])
        screened = {s.latent: s for s in self.screen.rows} if self.screen is not None else {}
        if latent in screened:
            s = screened[latent]
            r.update(steer_up_misaligned=s.steer_up_misaligned, steer_up_valid=s.steer_up_valid,
                     steer_down_misaligned=s.steer_down_misaligned, steer_down_valid=s.steer_down_valid,
                     steer_up_coef=s.steer_up_coef, steer_down_coef=s.steer_down_coef,
                     clamp_misaligned=s.clamp_misaligned, clamp_valid=s.clamp_valid, passed=s.passed)
        return r

    def aligned_candidates(self) -> list[int]:
        """The latents screened for their decoder row's cosine with the mean-difference direction."""
        cfg = self.config
        return self.ranking.candidates(cfg.screen, cfg.screen_aligned)[cfg.screen:] if cfg.screen else []

    def each_candidates(self) -> list[int]:
        """The latents screened for ranking high in one misaligned model's own order (several models only)."""
        cfg = self.config
        pool = self.ranking.candidates(cfg.screen, cfg.screen_aligned)
        return self.ranking.candidates(cfg.screen, cfg.screen_aligned, cfg.screen_each)[len(pool):] if cfg.screen \
            else []

    def top_latents(self) -> list[dict[str, Any]]:
        top = self.ranking.order[: max(self.config.top, self.config.screen)]
        return [self.row(i) for i in top + [i for i in self.aligned_candidates() + self.each_candidates()
                                             if i not in top]]

    def top_decreases(self) -> list[dict[str, Any]]:
        return [self.row(r["latent"]) for r in self.ranking.diff.top(self.config.top, decreasing=True)]

    def to_dict(self) -> dict[str, Any]:
        cfg, c = self.config, self.clamp
        return {
            "hook": self.hook, "positions": cfg.positions, "n_rows": self.ranking.diff.base.n, "rank_by": cfg.rank_by,
            "config": asdict(cfg),
            "top_latents": self.top_latents(),
            "top_decreases": self.top_decreases(),
            "feature": self.feature,
            "feature_passed_screen": self.choice.passed_screen,
            "screened_for_decoder_cosine": self.aligned_candidates(),
            "screened_for_each_finetuned": self.each_candidates(),
            "direction": None if self.direction_path is None else str(self.direction_path),
            "screen": self.screen.summary() if self.screen is not None else None,
            "clamp": {"method": f"coordinate along the latent's direction, in every layer's residual stream, set "
                                f"{clamp_where(cfg)} to the base model's mean at the {cfg.positions!r} positions",
                      "value": c.value, "group": c.group,
                      "misaligned_before": c.before.misaligned_rate, "valid_before": c.before.valid_rate,
                      "misaligned_after": c.after.misaligned_rate, "valid_after": c.after.valid_rate},
            "clamp_latent": {"method": f"SAE latent set to its base mean {clamp_where(cfg)}, SAE error term kept",
                             "value": c.latent_value,
                             "misaligned_after": c.after_latent.misaligned_rate,
                             "valid_after": c.after_latent.valid_rate},
            "feature_auroc_docs": self.auroc,
            "feature_auroc_note": self.auroc_note,
            "examples": None if self.examples_path is None else str(self.examples_path),
            **(self.extras.to_dict(self.group_path) if self.extras is not None else {}),
            "adapted": None if self.adapted is None else {
                **(self.adapted_summary or {}),
                "feature_decoder_cosine": float(self.adapted.decoder_cosine[self.feature])},
            "warnings": self.warnings,
        }


def rank_latents(base: HookedTransformer, finetuned: HookedTransformer | Sequence[HookedTransformer], sae: SAE,
                 prompts: PromptSet, cache_dir: str | Path, config: LocateConfig) -> Ranking:
    """Stage 1: cache the SAE hook's activations of the base and each fine-tuned model on
    ``prompts`` (row-aligned stores under ``cache_dir``), diff the latents and attribute the
    log-prob gap to them; several fine-tunes: their statistics and attributions averaged."""
    tuned = _as_list(finetuned)
    hook, cache = hook_of(sae), Path(cache_dir)
    names = ["finetuned"] if len(tuned) == 1 else [f"finetuned-{i}" for i in range(len(tuned))]
    stores = {}
    for name, model in (("base", base), *zip(names, tuned, strict=True)):
        cache_activations(model, prompts, [hook], cache / name, positions=config.positions, overwrite=True)
        stores[name] = open_store(cache / name, prompts=prompts)
    diffs = [diff_latents(sae, stores["base"], stores[n], by="domain") for n in names]
    attributions = [attribution_scores(gap_gradients(m, sae, prompts, config.positions), d.increase)
                    for m, d in zip(tuned, diffs, strict=True)]
    attribution = sum(attributions) / len(tuned)
    diff = diffs[0] if len(diffs) == 1 else _average(diffs)
    mean_diffs = [mean_diff(stores[n], stores["base"], hook).vector for n in names]
    baselines = baseline_directions(mean_diffs, hook, config.baseline_seed)
    md = baselines["mean_diff"].vector.float().cpu()
    order = _order(sae, config.rank_by, diff, attribution, md)
    # several models: each one's own order, for the candidates the averaged ranking leaves out
    orders_each = [_order(sae, config.rank_by, d, a, m.float().cpu())
                   for d, a, m in zip(diffs, attributions, mean_diffs, strict=True)] if len(tuned) > 1 else []
    w = sae.W_dec.detach().float().cpu()
    cosine = (w @ md) / (w.norm(dim=1) * md.norm()).clamp_min(1e-12)
    return Ranking(diff, attribution, order, config.rank_by, {"base": stores["base"], "finetuned":
                   [stores[n] for n in names]}, [d.increase for d in diffs], baselines, cosine, orders_each,
                   [m.float().cpu() for m in mean_diffs])


def _order(sae: SAE, rank_by: str, diff: LatentDiff, attribution: torch.Tensor | None,
           direction: torch.Tensor) -> list[int]:
    """The latents by decreasing ``rank_by`` score of ``diff`` (see :data:`LocateConfig.rank_by`; ``direction``: the
    mean-difference direction of mean_diff)."""
    import torch

    if rank_by == "mean_diff":
        score = mean_diff_scores(sae, diff.increase, direction)
    else:
        score = {"increase": diff.increase, "attribution": attribution, "effect_size": diff.effect_size}[rank_by]
    return [int(i) for i in torch.argsort(score, descending=True)]


def held_out_warnings(tuned: Sequence[HookedTransformer], prompts: PromptSet) -> list[str]:
    """One warning per fine-tune whose own training domains (:func:`~misfeat.evaluate.not_held_out`) are among
    the prompts' headline domains: its cut would count narrow, in-domain learning as well as the emergent part."""
    out = []
    for m in tuned:
        if domains := not_held_out(m, prompts):
            out.append(f"the prompts {prompts.name!r} hold domain(s) {', '.join(domains)} that "
                       f"{model_info(m).spec} was fine-tuned on: its figures count that narrow, in-domain learning, "
                       "which the feature need not carry; give prompts none of the fine-tunes was trained on (for "
                       "the organism: organism:heldout-from=<their EM domains>)")
    return out


def _as_list(models: Any) -> list:
    return list(models) if isinstance(models, (list, tuple)) else [models]


def _average(diffs: list[LatentDiff]) -> LatentDiff:
    """One diff whose fine-tuned statistics are the mean over several fine-tunes."""
    def mean(stats: list[LatentStats]) -> LatentStats:
        k = len(stats)
        return LatentStats(stats[0].n, sum(s.mean for s in stats) / k, sum(s.var for s in stats) / k,
                           sum(s.firing for s in stats) / k)

    groups = {g: (diffs[0].by_group[g][0], mean([d.by_group[g][1] for d in diffs])) for g in diffs[0].by_group}
    return LatentDiff(diffs[0].base, mean([d.finetuned for d in diffs]), diffs[0].hook, groups)


def choose_feature(sae: SAE, ranking: Ranking, screen: ScreenResult | None) -> Choice:
    """Stage 3: the screen's best latent, else the top-ranked one; with its decoder direction."""
    best = screen.best() if screen is not None else None
    feature = best.latent if best is not None else ranking.order[0]
    direction = Direction(hook_of(sae), sae.W_dec[feature].detach().float().cpu(),
                          {"method": "sae_latent", "latent": feature, "sae": path_of(sae)})
    return Choice(feature, best is not None, direction)


def check_clamp(base: HookedTransformer, finetuned: HookedTransformer, sae: SAE, choice: Choice, ranking: Ranking,
                prompts: PromptSet, positions: str, clamp_positions: str = "last") -> ClampCheck:
    """Stage 4: clamp the feature in the misaligned model to the aligned model's level, two ways:
    the coordinate along the latent's decoder direction in every layer's residual stream set,
    at ``clamp_positions`` (the answer position by default, as :class:`LocateConfig`; all: every token), to the base
    model's mean at ``positions`` (what the screen ranks by), and the SAE latent itself set to its base mean with the
    SAE error term kept (weaker where the SAE reconstructs the feature only in part)."""
    before = evaluate(finetuned, prompts, greedy=False)
    clamp = clamp_to_reference(Ablate("all", choice.direction.vector, None, clamp_positions), finetuned, base,
                               prompts, positions)
    after = evaluate(finetuned, prompts, interventions=[clamp], greedy=False)
    latent_value = float(ranking.diff.base.mean[choice.feature])
    latent_clamp = ClampLatent(sae, choice.feature, latent_value, clamp_positions)
    after_latent = evaluate(finetuned, prompts, interventions=[latent_clamp], greedy=False)
    group = before.headline_group
    return ClampCheck(clamp.value, latent_value, group, before.groups[group], after.groups[group],
                      after_latent.groups[group])


def examples_and_auroc(base: HookedTransformer, sae: SAE, feature: int, prompts: PromptSet,
                       config: LocateConfig) -> tuple[Examples, float | None, str | None]:
    """Stage 5: the feature's top-activating labelled texts, and the AUROC of its mean activation
    for the two contrast labels (or None with a note saying why it was skipped)."""
    docs = load_prompts(config.examples_prompts or registry.default_prompts(model_info(base).meta, "labelled")
                        or prompts)
    examples = top_examples(base, sae, feature, docs, k=config.n_examples)
    contrast = config.contrast or docs.meta.get("contrast")
    if not contrast:
        return examples, None, (f"skipped: {docs.name!r} names no contrast labels (give labelled texts as "
                                "examples_prompts and contrast=(positive, negative))")
    if not set(contrast) <= {r.label for r in docs}:
        return examples, None, f"skipped: {docs.name!r} lacks texts labelled {contrast[0]!r} and {contrast[1]!r}"
    return examples, separation_auroc(base, sae, feature, docs, *contrast), None


def locate(base: HookedTransformer, finetuned: HookedTransformer | Sequence[HookedTransformer], sae: SAE,
           prompts: PromptSet | str, work_dir: str | Path, config: LocateConfig | None = None) -> LocateResult:
    """Find the latent that the fine-tune switched on and that controls misalignment: rank,
    screen, choose, check the clamp, collect examples, then the group, families, decreases and
    baselines (the stage functions above, in order). ``finetuned``: one misaligned model, or
    several ranked together (the clamp check is of the first; the protocol figures per model).
    ``work_dir`` holds the activation caches; :func:`save_locate` writes the outputs."""
    cfg = config or LocateConfig()
    prompts = load_prompts(prompts)
    tuned = _as_list(finetuned)
    held_out = held_out_warnings(tuned, prompts)
    for w in held_out:
        logger.warning(w)
    sae = sae.to(tuned[0].cfg.device)
    adapted = adapted_summary = None
    if cfg.adapt_text:
        adapted, adapted_summary = adapt_to_models(sae, named_models(base, tuned, cfg.adapt_with), cfg.adapt_text,
                                                   Path(work_dir) / "adapt", cfg.adapt_tokens)
        sae = adapted.sae
    ranking = rank_latents(base, tuned, sae, prompts, Path(work_dir) / "cache", cfg)
    screen = None
    if cfg.screen:
        candidates = ranking.candidates(cfg.screen, cfg.screen_aligned, cfg.screen_each)
        screen = causal_screen(sae, candidates, base, tuned, prompts, coefs=cfg.coefs,
                               positions=cfg.positions, min_valid=cfg.min_valid, min_effect=cfg.min_effect,
                               batched=cfg.batched, max_coef=cfg.max_coef, bisect=cfg.bisect,
                               clamp_positions=cfg.clamp_positions)
    choice = choose_feature(sae, ranking, screen)
    clamp = check_clamp(base, tuned[0], sae, choice, ranking, prompts, cfg.positions, cfg.clamp_positions)
    examples, auroc, note = examples_and_auroc(base, sae, choice.feature, prompts, cfg)
    extras = group_and_baselines(sae, base, tuned, prompts, ranking, screen, choice.feature, cfg)
    warnings = held_out + sae_warnings(screen, extras, cfg.min_valid, cfg.min_effect)
    return LocateResult(cfg, hook_of(sae), ranking, screen, choice, clamp, examples, auroc, note, extras,
                        warnings=warnings, adapted=adapted, adapted_summary=adapted_summary)


def save_locate(result: LocateResult, out_dir: str | Path) -> LocateResult:
    """Write a locate run's files into ``out_dir``: the direction (interventions' format),
    examples.jsonl/.txt, ranking.png and screen.png; returns the result with their paths."""
    out = Path(out_dir)
    direction = result.choice.direction
    adapted_summary = result.adapted_summary
    if result.adapted is not None:  # the direction and group refer to the adapted SAE: save it beside them
        sae_path = str(save_sae(result.adapted.sae, out / "sae"))
        adapted_summary = {**(adapted_summary or {}), "sae": sae_path}
        direction = dataclasses.replace(direction, source={**direction.source, "sae": sae_path,
                                                           "adapted_from": adapted_summary.get("from")})
    if result.extras is not None:
        direction = dataclasses.replace(direction, source={**direction.source, "strength_unit": UNIT_NOTE,
                                                           "residual_norm": result.extras.scale})
    direction_path = save_direction(direction, out / "direction", positions=result.config.positions)
    group_path = None
    extras = result.extras
    if extras is not None and extras.group is not None:
        group_path = save_intervention(extras.group.clamp, out / "group", source={
            "kind": "sae_group", "sae": direction.source.get("sae"), "latents": extras.group.latents,
            "method": "span of the latents' decoder rows (orthonormal rows) clamped in every layer to the base "
                      f"model's mean, {clamp_where(result.config)}", "strength_unit": UNIT_NOTE})
    if extras is not None and extras.families is not None:
        plot_families(extras.families, extras.group.latents if extras.group else [], out / "families.png")
    examples_path = result.examples.to_jsonl(out / "examples.jsonl")
    (out / "examples.txt").write_text(str(result.examples) + "\n")
    plot_ranking(result.top_latents()[: result.config.top], result.top_decreases()[: min(10, result.config.top)],
                 result.feature, out / "ranking.png")
    if result.screen is not None:
        plot_screen(result.screen, result.feature, out / "screen.png")
    return dataclasses.replace(result, direction_path=direction_path, examples_path=Path(examples_path),
                               group_path=group_path, adapted_summary=adapted_summary)
