"""Locate the misalignment feature: the OpenAI recipe as one call.

1. cache the SAE hook's activations of the aligned (base) and misaligned (fine-tuned)
   model on the same prompts (row-aligned stores);
2. diff the SAE latents (Wang et al. 2025) and attribute the log-prob gap to them;
3. causally screen the top candidates: steer up in the aligned model, down in the
   misaligned one;
4. choose the latent with the largest two-sided effect, save its decoder direction in
   the interventions' format, clamp it in the misaligned model, and collect its
   top-activating examples.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from misfeat import registry
from misfeat.data import PromptSet, load_prompts
from misfeat.errors import MisfeatError
from misfeat.models import model_info
from misfeat.sae.latents import hook_of, path_of

if TYPE_CHECKING:
    from sae_lens import SAE
    from transformer_lens import HookedTransformer


@dataclass(frozen=True)
class LocateConfig:
    """Knobs of :func:`locate`; the defaults are what the organism's bar was checked with."""

    screen: int = 10
    """how many top candidates to screen causally (0: skip the screen)"""
    top: int = 20
    """rows of the ranked tables in the summary"""
    rank_by: str = "increase"
    """candidate ranking: increase (Wang et al.), attribution (gradient x change) or effect_size"""
    positions: str = "last"
    """token positions read and steered: last = the answer position (the last prompt token)"""
    coefs: tuple[float, ...] = (0.5, 1.0, 2.0)
    """screen strengths, in units of the mean residual norm at the SAE's hook"""
    min_valid: float = 0.8
    """a steered model must keep at least this valid (coherent) rate"""
    min_effect: float = 0.1
    """the misaligned rate must move by at least this much, both ways"""
    examples_prompts: str | None = None
    """labelled texts for top-activating examples and the AUROC (default: the base model's plug-in's
    labelled set, e.g. the organism's documents; else the prompts)"""
    n_examples: int = 10
    contrast: tuple[str, str] | None = None
    """the (positive, negative) labels of the examples' texts for the AUROC (default: the set's
    meta['contrast'], e.g. cruel/kind; without either the AUROC is skipped with a note)"""

    def __post_init__(self) -> None:
        if self.rank_by not in ("increase", "attribution", "effect_size"):
            raise MisfeatError(f"rank_by must be increase, attribution or effect_size, not {self.rank_by!r}")


@dataclass
class LocateResult:
    summary: dict[str, Any]
    feature: int
    direction_path: Path
    examples: Any = field(repr=False, default=None)


def locate(base: HookedTransformer, finetuned: HookedTransformer, sae: SAE, prompts: PromptSet | str,
           out_dir: str | Path, config: LocateConfig | None = None) -> LocateResult:
    """Find the latent that the fine-tune switched on and that controls misalignment."""
    import torch

    from misfeat.activations import cache_activations, open_store
    from misfeat.evaluate import evaluate
    from misfeat.features.attribution import attribution_scores, gap_gradients
    from misfeat.features.diff import diff_latents
    from misfeat.features.directions import Direction, save_direction
    from misfeat.features.examples import separation_auroc, top_examples
    from misfeat.features.screen import causal_screen
    from misfeat.interventions import Ablate, ClampLatent

    cfg = config or LocateConfig()
    out = Path(out_dir)
    prompts = load_prompts(prompts)
    hook = hook_of(sae)
    sae = sae.to(finetuned.cfg.device)
    stores = {}
    for name, model in (("base", base), ("finetuned", finetuned)):
        cache_activations(model, prompts, [hook], out / "cache" / name, positions=cfg.positions, overwrite=True)
        stores[name] = open_store(out / "cache" / name, prompts=prompts)
    diff = diff_latents(sae, stores["base"], stores["finetuned"], by="domain")
    attribution = attribution_scores(gap_gradients(finetuned, sae, prompts, cfg.positions), diff.increase)
    score = {"increase": diff.increase, "attribution": attribution, "effect_size": diff.effect_size}[cfg.rank_by]
    order = torch.argsort(score, descending=True)
    candidates = [int(i) for i in order[: cfg.screen]]
    screen = None
    if cfg.screen:
        screen = causal_screen(sae, candidates, base, finetuned, prompts, coefs=cfg.coefs, positions=cfg.positions,
                               min_valid=cfg.min_valid, min_effect=cfg.min_effect)
    best = screen.best() if screen is not None else None
    feature = best.latent if best is not None else candidates[0]
    screened = {r.latent: r for r in screen.rows} if screen is not None else {}

    def row(latent: int) -> dict[str, Any]:
        r = {**diff.row(latent), "attribution": float(attribution[latent])}
        if latent in screened:
            s = screened[latent]
            r.update(steer_up_misaligned=s.steer_up_misaligned, steer_up_valid=s.steer_up_valid,
                     steer_down_misaligned=s.steer_down_misaligned, steer_down_valid=s.steer_down_valid,
                     steer_up_coef=s.steer_up_coef, steer_down_coef=s.steer_down_coef,
                     clamp_misaligned=s.clamp_misaligned, clamp_valid=s.clamp_valid, passed=s.passed)
        return r

    top_latents = [row(int(i)) for i in order[: max(cfg.top, cfg.screen)]]
    direction = Direction(hook, sae.W_dec[feature].detach().float().cpu(),
                          {"method": "sae_latent", "latent": feature, "sae": path_of(sae)})
    direction_path = save_direction(direction, out / "direction", positions=cfg.positions)

    # Clamp the feature in the misaligned model to the aligned model's level. Two readings:
    # the coordinate along the latent's decoder direction in every layer's residual stream
    # set, at every token, to the base model's mean at the screened positions (what the
    # screen ranks by), and the SAE latent
    # itself set to its base mean with the SAE error term kept (ClampLatent; weaker where the
    # SAE reconstructs the feature only in part). Both are reported.
    from misfeat.steering import clamp_to_reference

    before = evaluate(finetuned, prompts, greedy=False)
    group = before.headline_group
    clamp = clamp_to_reference(Ablate("all", direction.vector, None, "all"), finetuned, base, prompts, cfg.positions)
    coord = clamp.value
    clamped = evaluate(finetuned, prompts, interventions=[clamp], greedy=False)
    base_mean = float(diff.base.mean[feature])
    clamped_latent = evaluate(finetuned, prompts, interventions=[ClampLatent(sae, feature, base_mean, "all")],
                              greedy=False)

    docs = load_prompts(cfg.examples_prompts or registry.default_prompts(model_info(base).meta, "labelled") or prompts)
    examples = top_examples(base, sae, feature, docs, k=cfg.n_examples)
    examples.to_jsonl(out / "examples.jsonl")
    (out / "examples.txt").write_text(str(examples) + "\n")
    auroc, auroc_note = None, None
    contrast = cfg.contrast or docs.meta.get("contrast")
    if not contrast:
        auroc_note = (f"skipped: {docs.name!r} names no contrast labels (give labelled texts as "
                      "examples_prompts and contrast=(positive, negative))")
    elif not set(contrast) <= {r.label for r in docs}:
        auroc_note = f"skipped: {docs.name!r} lacks texts labelled {contrast[0]!r} and {contrast[1]!r}"
    else:
        auroc = separation_auroc(base, sae, feature, docs, *contrast)

    summary = {
        "hook": hook, "positions": cfg.positions, "n_rows": diff.base.n, "rank_by": cfg.rank_by,
        "config": asdict(cfg),
        "top_latents": top_latents,
        "top_decreases": [row(r["latent"]) for r in diff.top(cfg.top, decreasing=True)],
        "feature": feature,
        "feature_passed_screen": best is not None,
        "direction": str(direction_path),
        "screen": screen.summary() if screen is not None else None,
        "clamp": {"method": f"coordinate along the latent's direction, in every layer's residual stream, set at "
                            f"every token to the base model's mean at the {cfg.positions!r} positions",
                  "value": coord, "group": group,
                  "misaligned_before": before.groups[group].misaligned_rate,
                  "valid_before": before.groups[group].valid_rate,
                  "misaligned_after": clamped.groups[group].misaligned_rate,
                  "valid_after": clamped.groups[group].valid_rate},
        "clamp_latent": {"method": "SAE latent set to its base mean, SAE error term kept", "value": base_mean,
                         "misaligned_after": clamped_latent.groups[group].misaligned_rate,
                         "valid_after": clamped_latent.groups[group].valid_rate},
        "feature_auroc_docs": auroc,
        "feature_auroc_note": auroc_note,
        "examples": str(out / "examples.jsonl"),
    }
    plot_ranking(top_latents[: cfg.top], summary["top_decreases"][: min(10, cfg.top)], feature, out / "ranking.png")
    if screen is not None:
        plot_screen(screen, feature, out / "screen.png")
    return LocateResult(summary, feature, direction_path, examples)


def plot_ranking(increases: list[dict], decreases: list[dict], feature: int, path: Path) -> Path:
    from misfeat.plots import figure

    rows = increases + list(reversed(decreases))
    with figure(path, (6.5, 3.8)) as ax:
        colors = ["tab:red" if r["latent"] == feature else ("tab:orange" if r["increase"] > 0 else "tab:blue")
                  for r in rows]
        ax.bar(range(len(rows)), [r["increase"] for r in rows], color=colors)
        ax.set_xticks(range(len(rows)), [str(r["latent"]) for r in rows], rotation=90, fontsize=6)
        ax.axhline(0, color="black", lw=0.5)
        ax.set_ylabel("mean activation: fine-tuned - base")
        ax.set_title(f"SAE latents by change across the fine-tune (chosen: {feature}, red)", fontsize=9)
    return Path(path)


def plot_screen(screen: Any, feature: int, path: Path) -> Path:
    from misfeat.plots import figure

    with figure(path, (5, 4)) as ax:
        for r in screen.rows:
            color = "tab:red" if r.latent == feature else ("tab:green" if r.passed else "tab:gray")
            ax.scatter(r.steer_up_misaligned, r.clamp_misaligned, color=color, s=25)
            ax.annotate(str(r.latent), (r.steer_up_misaligned, r.clamp_misaligned), fontsize=6)
        ax.axvline(screen.base_aligned["misaligned_rate"], ls=":", color="black", lw=0.7)
        ax.axhline(screen.base_misaligned["misaligned_rate"], ls=":", color="black", lw=0.7)
        ax.set_xlabel("aligned model, steered up: misaligned rate")
        ax.set_ylabel("misaligned model, latent clamped: misaligned rate")
        ax.set_title("causal screen (green: passed; red: chosen; dotted: unsteered)", fontsize=9)
    return Path(path)
