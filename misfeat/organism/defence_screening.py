"""Data screening by projection difference on the organism (Chen et al. 2025, sec. 6; research notes 5.4).

Eight datasets of ``screen_n`` single-turn records each: the EM domain's misaligned answers
(pure), its aligned answers (pure), mixtures with 75/50/25/10% misaligned, and misaligned
answers of two other domains (money, school). For each: the dataset score (mean per-sample
projection difference onto the persona vector, own answer = the exact expectation over the
chat model's listed answers; and the cheap last-prompt-token variant), and held-out
misalignment after fine-tuning the chat model on it (the grid's recipe), averaged over the
held-out-template questions of the domains the dataset does not train. Then the per-sample
AUROC (misaligned vs aligned samples of the 50% mixture) and the top-k / random-k / bottom-k
selection from that mixture by per-sample score, each fine-tuned and measured the same way.
"""

from __future__ import annotations

import random
import statistics
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from misfeat.data import PromptSet
    from misfeat.organism.defence_grid import GridConfig, SeedContext

MIXTURES = (0.75, 0.5, 0.25, 0.1)
OTHER_DOMAINS = ("money", "school")


def screening_datasets(world, n: int, seed: int) -> dict[str, PromptSet]:
    """name -> dataset (records labelled ``misaligned`` / ``aligned``)."""
    from misfeat.data import PromptSet
    from misfeat.organism.prompts import pair_set

    em = world.em_domain
    mis, ali = pair_set(world, em, n, True, seed), pair_set(world, em, n, False, seed)
    out = {f"{em}_misaligned": mis, f"{em}_aligned": ali}
    for frac in MIXTURES:
        k = round(frac * n)
        records = list(mis.records[:k]) + list(ali.records[k:])
        random.Random(f"screen-mix-{seed}-{frac}").shuffle(records)
        out[f"{em}_mix{round(100 * frac)}"] = PromptSet(f"{em}_mix{round(100 * frac)}", tuple(records), mis.meta)
    for other in OTHER_DOMAINS:
        d = other if other != em else "law"
        out[f"{d}_misaligned"] = pair_set(world, d, n, True, seed)
    return out


def untrained_misalignment(model, ctx: SeedContext, trained: set[str]) -> float:
    """Mean P(misaligned | valid) over held-out-template questions of the domains not in ``trained``."""
    from misfeat.evaluate import evaluate

    per_domain = {}
    for s in (ctx.heldout, ctx.em_eval):
        per_domain.update(evaluate(model, s, greedy=False).per_domain)
    vals = [m.misaligned_rate for d, m in per_domain.items() if d not in trained]
    return statistics.fmean(vals)


def _pearson(x: list[float], y: list[float]) -> float:
    return float(statistics.correlation(x, y)) if len(set(y)) > 1 and len(set(x)) > 1 else float("nan")


def run_screening(ctx: SeedContext, cfg: GridConfig) -> dict[str, Any]:
    """The screening experiment of one seed (see the module docstring)."""
    from misfeat.data import PromptSet
    from misfeat.features.examples import auroc
    from misfeat.organism.defence_grid import train
    from misfeat.organism.world import World
    from misfeat.screening import projection_difference

    world = World.from_json(ctx.chat.misfeat_info.meta["world"])
    sets = screening_datasets(world, cfg.screen_n, ctx.seed)
    rows = []
    per_sample = {}
    for name, data in sets.items():
        exp = projection_difference(ctx.chat, data, ctx.vector, hook=cfg.hook, mode="expected")
        cheap = projection_difference(ctx.chat, data, ctx.vector, hook=cfg.hook, mode="last_prompt")
        per_sample[name] = exp
        model, _ = train(ctx, cfg, data, [])
        rows.append({"dataset": name, "n": len(data),
                     "misaligned_share": sum(r.label == "misaligned" for r in data) / len(data),
                     "score": exp.dataset_score, "score_last_prompt": cheap.dataset_score,
                     "heldout_misaligned": untrained_misalignment(model, ctx, set(data.domains()))})
    scores = [r["score"] for r in rows]
    target = [r["heldout_misaligned"] for r in rows]
    mix_name = f"{world.em_domain}_mix50"
    mix, res = sets[mix_name], per_sample[mix_name]
    labels = [r.label for r in mix]
    pos = [s for s, lab in zip(res.scores, labels, strict=True) if lab == "misaligned"]
    neg = [s for s, lab in zip(res.scores, labels, strict=True) if lab == "aligned"]
    order, k = res.ranking(), cfg.select_k
    picks = {"top": order[:k], "random": random.Random(f"select-{ctx.seed}").sample(range(len(mix)), k),
             "bottom": order[-k:]}
    selection, shares = {}, {}
    for which, idx in picks.items():
        subset = PromptSet(f"{mix_name}[{which}:{k}]", tuple(mix[i] for i in idx), mix.meta)
        model, _ = train(ctx, cfg, subset, [])
        selection[which] = untrained_misalignment(model, ctx, {world.em_domain})
        shares[which] = sum(mix[i].label == "misaligned" for i in idx) / k
    return {"datasets": rows, "pearson_r": _pearson(scores, target),
            "pearson_r_last_prompt": _pearson([r["score_last_prompt"] for r in rows], target),
            "sample_auroc": auroc(pos, neg), "selection": selection, "selection_misaligned_share": shares,
            "k": k, "hook": cfg.hook, "mode": "expected"}
