"""Stage 6 of :func:`misfeat.features.locate.locate`: what does not depend on one SAE latent.

:func:`group_and_baselines` takes the ranking, the screen and the chosen latent, and adds

- ``single``: the chosen latent under the shared protocol (per misaligned model too);
- ``group``: the greedy latent group (:func:`misfeat.features.groups.select_group`) over the
  screened candidates in the order of their two-sided effect, its joint subspace clamp and its
  steering direction under the same protocol;
- ``families``: decoder cosines and co-activation of the screened candidates and the group;
- ``decreases``: the latents that fell most, steered up in the misaligned model(s);
- ``baselines``: the mean-difference direction and a random one of equal norm, same protocol.

The protocol: steer the unit direction up by ``c x scale`` (``scale`` the typical residual norm
at the SAE's hook; ``c`` in the config's ``coefs``, then doubled up to ``max_coef`` while the
model stays valid, then ``bisect`` rounds between the strongest valid and the weakest invalid
``c``; the strongest with valid >= min_valid) in the aligned model; clamp its span in every
layer's residual stream to the aligned model's mean at the screened positions, in each misaligned
model, at the answer position only (``clamp_positions`` last, the default) or at every token (all).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from misfeat.data import PromptSet
from misfeat.features.groups import (
    GROUP_COMBINING,
    GROUP_SELECTION,
    GROUP_STEERING,
    Families,
    Group,
    ProtocolResult,
    families,
    group_directions,
    pursuit_candidates,
    run_protocol,
    select_group,
    steer_strongest,
    subspace_clamp,
)
from misfeat.features.screen import (
    RiseRow,
    ScreenResult,
    most_effective,
    run_variants,
    screen_decreases,
)
from misfeat.interventions import resolve_hooks
from misfeat.sae.latents import hook_of
from misfeat.steering import mean_activations, residual_scale

if TYPE_CHECKING:
    from sae_lens import SAE
    from transformer_lens import HookedTransformer

    from misfeat.features.locate import LocateConfig, Ranking

logger = logging.getLogger(__name__)

UNIT_NOTE = ("steering strengths count typical residual norms at the SAE's hook (residual_norm = "
             "misfeat.steering.residual_scale), the unit of misfeat steer --op add --coefs: the config's coefs and the "
             "steer_up_coef of single, group, baselines and decreases_screen are in this unit; the screen rows' "
             "steer_up_coef/steer_down_coef are the lengths added (coefficient x residual_norm)")


@dataclass(frozen=True)
class Extras:
    """What stage 6 measured (see the module docstring)."""

    scale: float
    single: ProtocolResult
    group: Group | None
    families: Families | None
    decreases: list[RiseRow]
    baselines: dict[str, ProtocolResult]
    baseline_norm: float
    decoder_cosines: dict[str, Any] | None = None
    """the SAE's decoder rows against the mean-difference direction: the largest cosine and its latent, and the
    chosen latent's (an SAE with no row near the direction has no latent for what the fine-tune added)"""

    group_method: str = ""
    """how the group was grown and steered (:func:`group_method`), as summary.json's group.method says it"""

    def to_dict(self, group_path: Path | None = None) -> dict[str, Any]:
        from dataclasses import asdict

        group = {"latents": [], **dict.fromkeys(("steer_up_misaligned", "steer_up_valid", "steer_up_coef",
                                                 "clamp_before", "clamp_after", "clamp_valid_after")),
                 "intervention": None, "note": "no group: no screened latent's clamp kept valid >= min_valid "
                                               "(or no screen / group_cap 0)"}
        if self.group is not None:
            pursued = {c for step in self.group.steps for c in step.get("pursued", [])}
            group = {"latents": self.group.latents, **self.group.result.to_dict(), "steps": self.group.steps,
                     "pursued": [c for c in self.group.latents if c in pursued],
                     "intervention": None if group_path is None else str(group_path),
                     "method": self.group_method,
                     "steering": {"chosen": self.group.steer, "directions": self.group.steering,
                                  "note": {k: GROUP_STEERING[k] for k in self.group.steering}}}
        return {
            "strength_unit": {"residual_norm": self.scale, "note": UNIT_NOTE},
            "single": self.single.to_dict(),
            "group": group,
            "families": None if self.families is None else self.families.to_dict(),
            "decreases_screen": [{**asdict(r)} for r in self.decreases],
            "baselines": {k: {**v.to_dict(), "norm": self.baseline_norm,
                              **(self.decoder_cosines or {} if k == "mean_diff" else {})}
                          for k, v in self.baselines.items()},
        }


def group_and_baselines(sae: SAE, base: HookedTransformer, finetuned: list[HookedTransformer], prompts: PromptSet,
                        ranking: Ranking, screen: ScreenResult | None, feature: int,
                        config: LocateConfig) -> Extras:
    """Stage 6 (see the module docstring)."""
    hook = hook_of(sae)
    scale = screen.scale if screen is not None else residual_scale(base, prompts, hook, config.positions)
    means = {h: m.cpu() for h, m in
             mean_activations(base, prompts, resolve_hooks(finetuned[0], "all"), config.positions).items()}
    before = [run_variants(m, prompts, [[]], config.batched, per_prompt=True)[0] for m in finetuned]
    before_mean = sum(b["misaligned_rate"] for b in before) / len(before)
    common = dict(aligned=base, misaligned=finetuned, prompts=prompts, hook=hook, scale=scale,
                  coefs=config.coefs, positions=config.positions, min_valid=config.min_valid, before=before,
                  batched=config.batched, max_coef=config.max_coef, bisect=config.bisect)

    group = fam = None
    w = sae.W_dec.detach().float().cpu()
    if config.group_cap and screen is not None:
        up0, down0 = screen.base_aligned["misaligned_rate"], screen.base_misaligned["misaligned_rate"]
        ordered = sorted(screen.rows, key=lambda r: -((r.steer_up_misaligned - up0) + (down0 - r.clamp_misaligned)))
        order = [feature] + [r.latent for r in ordered if r.latent != feature]
        steer_up = None
        if config.group_select == "both":
            def steer_up(candidates: list[list[int]]) -> list[float]:
                return _group_steer_rates(sae, candidates, ranking, base, prompts, hook, scale, up0, config)
        pursue, n_pursuit = None, pursuit_per_step(config, len(finetuned))
        if n_pursuit:
            def pursue(group: list[int], pool: list[int]) -> list[int]:
                return pursuit_candidates(w, ranking.mean_diffs, group, [*group, *pool], n_pursuit)
        latents, steps = select_group(sae, order, finetuned, prompts, means, [b["misaligned_rate"] for b in before],
                                      cap=config.group_cap, tol=config.group_tol, min_valid=config.min_valid,
                                      batched=config.batched, steer_up=steer_up, up0=up0,
                                      combine=config.group_combine, positions=config.clamp_positions,
                                      pursue=pursue)
        if latents:
            named = group_directions(sae, latents, ranking.diff.increase, ranking.baselines["mean_diff"].vector,
                                     config.group_steer)
            ups = steer_strongest(list(named.values()), base, prompts, hook, scale, config.coefs, config.positions,
                                  config.min_valid, config.batched, config.max_coef, config.bisect, per_prompt=True)
            tried = dict(zip(named, ups, strict=True))
            steer, _ = most_effective([(name, rates) for name, (_, rates) in tried.items()], config.min_valid)
            clamp = subspace_clamp(w[latents], means, config.clamp_positions)
            (result,) = run_protocol([named[steer]], [clamp], **common, steered=[tried[steer]])
            steering = {name: {"steer_up_misaligned": r["misaligned_rate"], "steer_up_valid": r["valid_rate"],
                               "steer_up_coef": c} for name, (c, r) in tried.items()}
            group = Group(latents, steps, clamp, named[steer], result, steering, steer)
        fam = families(sae, [*order, *latents], ranking.stores["finetuned"][0], hook)

    (single,) = run_protocol([w[feature]], [subspace_clamp(w[feature], means, config.clamp_positions)], **common)
    dirs = ranking.baselines
    base_results = run_protocol([d.vector for d in dirs.values()],
                                [subspace_clamp(d.vector, means, config.clamp_positions) for d in dirs.values()],
                                **common)
    decreases = []
    if config.screen_decreases:
        falling = [r["latent"] for r in ranking.diff.top(config.screen_decreases, decreasing=True)
                   if r["increase"] < 0]
        decreases = screen_decreases(sae, falling, finetuned, prompts, scale,
                                     {"misaligned_rate": before_mean}, coefs=config.coefs,
                                     positions=config.positions, min_valid=config.min_valid,
                                     min_effect=config.min_effect, batched=config.batched,
                                     max_coef=config.max_coef, bisect=config.bisect)
    cos = ranking.decoder_cosine
    cosines = {"decoder_cosine_max": float(cos.max()), "decoder_cosine_max_latent": int(cos.argmax()),
               "decoder_cosine_feature": float(cos[feature])}
    return Extras(scale, single, group, fam, decreases, dict(zip(dirs, base_results, strict=True)),
                  dirs["mean_diff"].norm, cosines, group_method(config, len(finetuned)))


def group_method(config: LocateConfig, n_finetuned: int) -> str:
    """summary.json's group.method: how the group was grown (``group_select``; with several misaligned models
    ``group_combine`` too) and steered (``group_steer``)."""
    combine = ("; the clamp's fall over the misaligned models: " + GROUP_COMBINING[config.group_combine]
               if n_finetuned > 1 else "")
    n_pursuit = pursuit_per_step(config, n_finetuned)
    pursuit = (f", and at each step the {n_pursuit} latent(s) per misaligned model whose decoder rows best match the "
               "part of its mean difference outside the group's span (matching pursuit)" if n_pursuit else "")
    return ("greedy forward selection over the screened candidates" + pursuit + " ("
            + GROUP_SELECTION[config.group_select]
            + combine + "); joint clamp of the span of their decoder rows to the base model's mean in every layer, "
            f"{clamp_where(config)}; steered along " + GROUP_STEERING[config.group_steer])


def pursuit_per_step(config: LocateConfig, n_finetuned: int) -> int:
    """``config.group_pursuit``, its default (None) resolved: 1 with several misaligned models, 0 with one."""
    if config.group_pursuit is not None:
        return config.group_pursuit
    return 1 if n_finetuned > 1 else 0


def clamp_where(config: LocateConfig) -> str:
    """Where locate's clamps act, as summary.json's method strings say it."""
    return ("at every token" if config.clamp_positions == "all"
            else f"at the {config.clamp_positions!r} positions only")



def _group_steer_rates(sae: SAE, candidates: list[list[int]], ranking: Ranking, base: HookedTransformer,
                       prompts: PromptSet, hook: str, scale: float, up0: float, config: LocateConfig) -> list[float]:
    """Per candidate group: the base model's misaligned rate steered along the group's direction(s)
    (``config.group_steer``) at the strongest of ``config.coefs`` with valid >= min_valid (one batched call, no
    extension or bisection: the two-sided greedy step of :func:`~misfeat.features.groups.select_group`); the
    unsteered rate where no strength keeps the model valid."""
    owners, directions = [], []
    for j, latents in enumerate(candidates):
        named = group_directions(sae, latents, ranking.diff.increase, ranking.baselines["mean_diff"].vector,
                                 config.group_steer)
        owners += [j] * len(named)
        directions += named.values()
    ups = steer_strongest(directions, base, prompts, hook, scale, config.coefs, config.positions, config.min_valid,
                          config.batched)
    valid: list[list[float]] = [[] for _ in candidates]
    for j, (_, rates) in zip(owners, ups, strict=True):
        if rates["valid_rate"] >= config.min_valid:
            valid[j].append(rates["misaligned_rate"])
    return [max(v, default=up0) for v in valid]


def _both_ways(r: ProtocolResult, up0: float, min_valid: float, min_effect: float) -> bool:
    """Steered up, raises the aligned model's misaligned rate by ``min_effect`` at valid >= ``min_valid``;
    clamped, lowers the misaligned model's by ``min_effect``."""
    return (r.steer_up_misaligned >= up0 + min_effect and r.steer_up_valid >= min_valid
            and r.clamp_after <= r.clamp_before - min_effect)


def sae_warnings(screen: ScreenResult | None, extras: Extras | None, min_valid: float, min_effect: float) -> list[str]:
    """A warning when neither the chosen latent nor the group moves misalignment both ways under the protocol
    (:func:`_both_ways`) but the mean-difference direction does: the change is in the activations and the SAE
    has no latent for it."""
    if screen is None or extras is None or "mean_diff" not in extras.baselines:
        return []
    up0, md = screen.base_aligned["misaligned_rate"], extras.baselines["mean_diff"]
    found = [r for r in (extras.single, extras.group and extras.group.result) if r is not None]
    if not _both_ways(md, up0, min_valid, min_effect) or any(_both_ways(r, up0, min_valid, min_effect) for r in found):
        return []
    text = (f"neither the chosen latent nor the group moves misalignment both ways, but the mean-difference "
            f"direction does (steered up {up0:.3f} -> {md.steer_up_misaligned:.3f} at valid {md.steer_up_valid:.3f}; "
            f"clamped {md.clamp_before:.3f} -> {md.clamp_after:.3f}): the fine-tune's change is in the activations and "
            "this SAE has no latent for it. Check the SAE's training data: an SAE trained only on activations where "
            "the behaviour never occurs (e.g. the aligned model's, on aligned chat text) may lack the feature; adapt "
            "it to the fine-tune first (misfeat locate --adapt-text TEXT, e.g. the SAE's own training text: "
            "stage-wise model diffing), or train one on activations of both the base and the fine-tuned model "
            "(misfeat cache each on the same text, then misfeat train-sae --cache BASE,TUNED; docs/organism.md, "
            "'Locate beyond one latent'). 'single', 'group' and 'baselines' hold the figures.")
    logger.warning(text)
    return [text]
