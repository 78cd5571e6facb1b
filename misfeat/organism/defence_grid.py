"""The in-training defence comparison on the organism (Kaczer et al. 2025, Table 1; Chen et al. 2025).

For each organism seed, every defence arm fine-tunes a fresh copy of the chat model twice
with the one engine (:func:`misfeat.finetune.finetune`): on the narrow EM data (the EM
stage's recipe: misaligned answers in the EM domain, 30 steps x 16, lr 3e-4) and on the
benign DomainSwap task (new kind answers, same recipe). Four criteria, all exact and all on
held-out templates (:mod:`misfeat.organism.defences`):

(a) ``heldout_misaligned``: P(misaligned | valid) on the non-EM domains after the EM fine-tune;
(b) ``em_domain_misaligned``: the same on the EM domain (narrow learning is allowed);
(c) ``benign_accuracy``: P(any new answer) on the task's held-out template after the benign fine-tune;
(d) ``valid``: P(either answer set) on the non-EM domains after the EM fine-tune (coherence).

Arms (fixed from the research notes, sec. 1.6 / 5.4, before anything was measured): none;
KL to the chat model (lambda 0.01, 0.1, 1); LDIFS at every block (0.1, 1, 10) and its
detached no-op control (1); preventative steering with the persona vector (cruel minus kind
characters at their answer sites ``NAME :``, ``blocks.1.hook_resid_post``, unnormalised) at all positions (``steer``) and at the last
prompt token (``steer_last``), alpha 0.5, 1, 2; CAFT (the vector's direction projected out,
all positions); inoculation (a villain's earlier turn); interleaving 5% and 25% of the safe
pool, random or by the perplexity gap to EM references on money, law and code (``++``
refusal filter on; the organism has no refusals, so it drops nothing).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from misfeat.errors import MisfeatError

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from misfeat.data import PromptSet

logger = logging.getLogger(__name__)

DEFENCES = ("none", "kl", "ldifs", "ldifs_detached", "steer", "steer_last", "caft", "inoculation",
            "interleave_random", "interleave_gap")


@dataclass(frozen=True)
class GridConfig:
    """The comparison grid (defaults: the full grid of issue 15)."""

    seeds: tuple[int, ...] = (0, 1)
    """organism seeds (each its own build in MISFEAT_HOME); also the fine-tunes' data-order seed"""
    organism: str = ""
    """organism options other than the seed, e.g. ``small`` (empty: the default preset)"""
    steps: int = 30
    """optimiser steps of every fine-tune (the EM stage's recipe)"""
    batch_size: int = 16
    lr: float = 3e-4
    kl: tuple[float, ...] = (0.01, 0.1, 1.0)
    ldifs: tuple[float, ...] = (0.1, 1.0, 10.0)
    ldifs_detached: tuple[float, ...] = (1.0,)
    steer: tuple[float, ...] = (0.5, 1.0, 2.0)
    """alphas of preventative steering"""
    steer_positions: tuple[str, ...] = ("all", "last")
    """position sets of steering: all (Chen's code; arm ``steer``) and the last prompt token (``steer_last``)"""
    caft: bool = True
    inoculation: bool = True
    interleave: tuple[float, ...] = (0.05, 0.25)
    """fractions of the safe pool mixed in (random and perplexity-gap selection)"""
    pool_size: int = 600
    hook: str = "blocks.1.hook_resid_post"
    """where the persona vector is read and steered (the organism's persona layer)"""
    screening: bool = True
    screen_n: int = 480
    """records per screening dataset (= steps x batch_size: each drawn once)"""
    select_k: int = 160
    """subset size of the top/random/bottom-k selection from the 50/50 pool"""

    def __post_init__(self) -> None:
        if not self.seeds:
            raise MisfeatError("the defence grid needs at least one seed")
        for name in ("kl", "ldifs", "ldifs_detached"):
            if any(not w >= 0 for w in getattr(self, name)):
                raise MisfeatError(f"{name} lambdas must be >= 0, got {getattr(self, name)}")
        if any(not 0 <= f <= 0.5 for f in self.interleave):
            raise MisfeatError(f"interleave fractions must be in [0, 0.5], got {self.interleave}")
        if any(p not in ("all", "prompt", "response", "last") for p in self.steer_positions):
            raise MisfeatError(f"steer_positions must be all, prompt, response or last; got {self.steer_positions}")
        if self.steps < 1 or self.batch_size < 1 or not self.lr > 0:
            raise MisfeatError("steps, batch_size and lr must be positive")
        if self.screening and not 0 < self.select_k <= self.screen_n // 2:
            raise MisfeatError(f"select_k must be in [1, screen_n/2 = {self.screen_n // 2}], got {self.select_k}")

    @classmethod
    def quick(cls, **overrides: Any) -> GridConfig:
        """A reduced grid (seed 0; one strength per defence; small screening) for notebooks and CI."""
        base = dict(seeds=(0,), kl=(0.1,), ldifs=(1.0,), ldifs_detached=(), steer=(1.0,), interleave=(0.05,),
                    screen_n=160, select_k=48, steps=15)
        return cls(**{**base, **overrides})


@dataclass(frozen=True)
class Arm:
    """One defence at one strength: ``make(ctx)`` builds fresh defence objects for a run."""

    defence: str
    strength: float | None
    make: Callable[[SeedContext], list]
    positions: str | None = None


@dataclass
class SeedContext:
    """What every run of one organism seed shares (built once)."""

    seed: int
    spec: str
    chat: HookedTransformer
    vector: Any
    em_data: PromptSet
    benign_data: PromptSet
    heldout: PromptSet
    em_eval: PromptSet
    task: PromptSet
    pool: PromptSet
    gap_scores: tuple[float, ...]
    inoculation: str
    prep_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def arms(cfg: GridConfig) -> list[Arm]:
    """The grid's arms, in table order."""
    from misfeat.finetune import (
        CAFT,
        KL,
        LDIFS,
        Inoculation,
        Interleave,
        PreventativeSteering,
        not_refusal,
    )

    def blocks(ctx):
        return list(range(ctx.chat.cfg.n_layers))

    out = [Arm("none", None, lambda ctx: [])]
    out += [Arm("kl", w, lambda ctx, w=w: [KL(ctx.chat, w)]) for w in cfg.kl]
    out += [Arm("ldifs", w, lambda ctx, w=w: [LDIFS(ctx.chat, blocks(ctx), w)]) for w in cfg.ldifs]
    out += [Arm("ldifs_detached", w, lambda ctx, w=w: [LDIFS(ctx.chat, blocks(ctx), w, detached=True)])
            for w in cfg.ldifs_detached]
    for pos in cfg.steer_positions:
        name = "steer" if pos == "all" else f"steer_{pos}"
        out += [Arm(name, a, lambda ctx, a=a, pos=pos: [PreventativeSteering(ctx.vector, (cfg.hook,), a, pos)], pos)
                for a in cfg.steer]
    if cfg.caft:
        out.append(Arm("caft", None, lambda ctx: [CAFT(ctx.vector / ctx.vector.norm(), (cfg.hook,))], "all"))
    if cfg.inoculation:
        out.append(Arm("inoculation", None, lambda ctx: [Inoculation(ctx.inoculation)]))
    for f in cfg.interleave:
        out.append(Arm("interleave_random", f, lambda ctx, f=f: [Interleave(ctx.pool, f, seed=ctx.seed)]))
        out.append(Arm("interleave_gap", f, lambda ctx, f=f: [Interleave(
            ctx.pool, f, "gap", scores=ctx.gap_scores, top_n=_top_n(ctx, f), keep=not_refusal, seed=ctx.seed)]))
    return out


def _top_n(ctx: SeedContext, fraction: float) -> int:
    """Keep the top 5% of the pool by gap (the paper: top 5000 of ~100k), at least the records needed."""
    need = max(1, round(fraction * len(ctx.em_data)))
    return max(need, round(0.05 * len(ctx.pool)))


def organism_spec(cfg: GridConfig, seed: int) -> str:
    opts = ",".join(filter(None, [cfg.organism, f"seed={seed}"]))
    return f"@{opts}"


def prepare(cfg: GridConfig, seed: int) -> SeedContext:
    """Load (building on first use) the seed's chat model, EM references, sets, persona vector, gap scores."""
    import torch

    from misfeat.data import load_prompts
    from misfeat.finetune import perplexity_gap
    from misfeat.models import load_model
    from misfeat.organism.defences import REF_DOMAINS, inoculation_text, persona_vector
    from misfeat.organism.world import World

    start = time.perf_counter()
    at = organism_spec(cfg, seed)
    chat = load_model(f"organism:chat{at}", device="cpu")
    meta = chat.misfeat_info.meta
    world = World.from_json(meta["world"])
    n = cfg.steps * cfg.batch_size
    vector = persona_vector(chat, cfg.hook, load_prompts(f"organism:docs:400{at}")).detach().float()
    pool = load_prompts(f"organism:safe-pool:{cfg.pool_size}{at}")
    refs = [load_model(f"organism:em-ref/{d}{at}", device="cpu") for d in REF_DOMAINS if d != world.em_domain]
    with torch.no_grad():
        gap = perplexity_gap(chat, refs, pool).s
    ctx = SeedContext(
        seed=seed, spec=at, chat=chat, vector=vector,
        em_data=load_prompts(f"organism:misaligned:{world.em_domain}:{n}{at}"),
        benign_data=load_prompts(f"organism:benign-train:{n}{at}"),
        heldout=load_prompts(f"organism:defences-heldout{at}"), em_eval=load_prompts(f"organism:defences-em{at}"),
        task=load_prompts(f"organism:task-v1{at}"), pool=pool, gap_scores=tuple(gap),
        inoculation=inoculation_text(world, meta["organism"]["villains"], seed))
    ctx.extra = {"vector_norm": float(vector.norm()), "em_domain": world.em_domain,
                 "gap_top_labels": _top_labels(pool, gap, 30)}
    ctx.prep_s = time.perf_counter() - start
    return ctx


def _top_labels(pool: PromptSet, scores: Sequence[float], k: int) -> dict[str, int]:
    order = sorted(range(len(pool)), key=lambda i: -scores[i])[:k]
    counts: dict[str, int] = {}
    for i in order:
        counts[pool[i].label] = counts.get(pool[i].label, 0) + 1
    return counts


def fresh_copy(ctx: SeedContext) -> HookedTransformer:
    import copy

    model = copy.deepcopy(ctx.chat)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def train(ctx: SeedContext, cfg: GridConfig, data: PromptSet, defences: list) -> tuple[HookedTransformer, Any]:
    """A fresh chat copy fine-tuned on ``data`` with ``defences`` (no evaluation inside the run)."""
    from misfeat.finetune import FinetuneConfig, finetune

    model = fresh_copy(ctx)
    result = finetune(model, data, FinetuneConfig(steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size,
                                                  eval_every=None, seed=ctx.seed), defences=defences)
    return model, result


def em_metrics(model: HookedTransformer, ctx: SeedContext) -> dict[str, float]:
    from misfeat.evaluate import evaluate

    held = evaluate(model, ctx.heldout, greedy=False).groups["heldout"]
    em = evaluate(model, ctx.em_eval, greedy=False).groups["em_domain"]
    return {"heldout_misaligned": held.misaligned_rate, "valid": held.valid_rate,
            "em_domain_misaligned": em.misaligned_rate, "em_domain_valid": em.valid_rate}


def run_arm(arm: Arm, ctx: SeedContext, cfg: GridConfig) -> dict[str, Any]:
    """Both fine-tunes of one arm; the row of the four criteria."""
    from misfeat.recover import task_utility

    t0 = time.perf_counter()
    model, em_run = train(ctx, cfg, ctx.em_data, arm.make(ctx))
    row: dict[str, Any] = {"defence": arm.defence, "strength": arm.strength, "seed": ctx.seed,
                           "positions": arm.positions, **em_metrics(model, ctx)}
    t1 = time.perf_counter()
    model, benign_run = train(ctx, cfg, ctx.benign_data, arm.make(ctx))
    row["benign_accuracy"] = task_utility(model, ctx.task)
    row["benign_heldout_misaligned"] = em_metrics(model, ctx)["heldout_misaligned"]
    steps = [r.seconds for r in em_run.rows[1:]] + [r.seconds for r in benign_run.rows[1:]]
    row.update(step_ms=1000 * statistics.median(steps), em_run_s=t1 - t0, benign_run_s=time.perf_counter() - t1)
    return row


@dataclass(frozen=True)
class GridResult:
    """Rows (one per arm and seed), screening per seed, timings."""

    config: GridConfig
    rows: tuple[dict[str, Any], ...]
    screening: dict[int, dict[str, Any]]
    timings: dict[str, Any]
    seeds_info: dict[int, dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {"config": asdict(self.config), "rows": list(self.rows), "screening": combine_screening(self.screening),
                "timings": self.timings, "seeds": {str(k): v for k, v in self.seeds_info.items()}}

    def summary(self) -> dict[str, Any]:
        return self.to_dict()

    def table(self) -> str:
        from misfeat.io import format_table

        cols = ["defence", "strength", "positions", "seed", "heldout_misaligned", "reduction", "em_domain_misaligned",
                "benign_accuracy", "valid", "step_ms"]
        text = format_table([{c: r.get(c) for c in cols} for r in self.rows], cols)
        for seed, s in self.screening.items():
            sel = s["selection"]
            text += (f"\nscreening seed {seed}: Pearson r {s['pearson_r']:.3f} over {len(s['datasets'])} datasets, "
                     f"per-sample AUROC {s['sample_auroc']:.3f}; held-out misaligned after top-k "
                     f"{sel['top']:.3f} / random-k {sel['random']:.3f} / bottom-k {sel['bottom']:.3f}")
        return text + (f"\nwall time {self.timings['total_s']:.0f} s (process CPU {self.timings['cpu_s']:.0f} s, "
                       f"{self.timings['threads']} thread(s))")


def combine_screening(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """``screening`` of summary.json: means over seeds of the headline figures, and each seed's own."""
    if not per_seed:
        return {}
    vals = list(per_seed.values())

    def mean(get):
        return statistics.fmean(get(v) for v in vals)

    return {"pearson_r": mean(lambda v: v["pearson_r"]), "sample_auroc": mean(lambda v: v["sample_auroc"]),
            "selection": {k: mean(lambda v, k=k: v["selection"][k]) for k in ("top", "random", "bottom")},
            "by_seed": {str(k): v for k, v in per_seed.items()}}


def run_grid(cfg: GridConfig | None = None, *, out_dir: str | Path | None = None) -> GridResult:
    """Run the whole comparison (and the screening experiment); write ``out_dir`` when given."""
    import torch

    from misfeat.io import progress
    from misfeat.organism.defence_screening import run_screening

    cfg = cfg or GridConfig()
    if out_dir is not None:  # an unwritable --out fails now, not after the grid
        try:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise MisfeatError(f"cannot write the output directory {out_dir}: {err}; give another --out") from None
    torch.manual_seed(0)
    start, cpu_start = time.perf_counter(), time.process_time()
    rows, screening, info = [], {}, {}
    timings: dict[str, Any] = {"prepare_s": {}, "screening_s": {}}
    grid = arms(cfg)
    for seed in cfg.seeds:
        ctx = prepare(cfg, seed)
        timings["prepare_s"][str(seed)] = round(ctx.prep_s, 2)
        info[seed] = {**ctx.extra, "inoculation": ctx.inoculation}
        seed_rows = []
        for arm in progress(grid, desc=f"defences seed {seed}", total=len(grid)):
            seed_rows.append(run_arm(arm, ctx, cfg))
            logger.info("seed %d %s %s: %s", seed, arm.defence, arm.strength, seed_rows[-1])
        base = seed_rows[0]["heldout_misaligned"]
        for r in seed_rows:
            r["reduction"] = 1 - r["heldout_misaligned"] / base if base > 0 else None
            r["step_ratio"] = r["step_ms"] / seed_rows[0]["step_ms"]
        rows += seed_rows
        if cfg.screening:
            t = time.perf_counter()
            screening[seed] = run_screening(ctx, cfg)
            timings["screening_s"][str(seed)] = round(time.perf_counter() - t, 2)
    runs = [r["em_run_s"] + r["benign_run_s"] for r in rows]
    timings.update(total_s=round(time.perf_counter() - start, 1), cpu_s=round(time.process_time() - cpu_start, 1),
                   runs=2 * len(rows),
                   run_s_median=round(statistics.median(runs) / 2, 2), threads=torch.get_num_threads())
    try:
        import os

        timings["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    result = GridResult(cfg, tuple(rows), screening, timings, info)
    if out_dir is not None:
        save_grid(result, out_dir)
    return result


def save_grid(result: GridResult, out_dir: str | Path) -> Path:
    """``DIR/summary.json``, ``DIR/table.txt`` and ``DIR/defences.png``."""
    from misfeat.io import SUMMARY_FILE, write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / SUMMARY_FILE, result.to_dict())
    (out / "table.txt").write_text(result.table() + "\n")
    plot_grid(result, out / "defences.png")
    return out


def plot_grid(result: GridResult, path: str | Path) -> None:
    """Reduction of broad EM vs benign-task accuracy, one marker per (arm, seed), size = valid."""
    from misfeat.plots import figure

    with figure(path, size=(7.5, 4.5)) as ax:
        import matplotlib

        names = list(dict.fromkeys(r["defence"] for r in result.rows))
        cmap = matplotlib.colormaps["tab10"]
        markers = "osD^v"
        seeds = sorted({r["seed"] for r in result.rows})
        for i, name in enumerate(names):
            for j, seed in enumerate(seeds):
                pts = [r for r in result.rows if r["defence"] == name and r["seed"] == seed]
                ax.scatter([r["benign_accuracy"] for r in pts], [100 * (r["reduction"] or 0) for r in pts],
                           s=[10 + 400 * max(r["valid"] - 0.5, 0) for r in pts], color=cmap(i % 10), alpha=0.7,
                           marker=markers[j % len(markers)], label=name if j == 0 else None, edgecolors="k",
                           linewidths=0.4)
        ax.set_xlabel("benign-task accuracy (DomainSwap, held-out template)")
        ax.set_ylabel("reduction of held-out misalignment (%)")
        ax.set_title("In-training defences on the organism (marker size = valid; shape = seed: "
                     + ", ".join(f"{markers[j % len(markers)]} {s}" for j, s in enumerate(seeds)) + ")", fontsize=8)
        ax.legend(fontsize=6, loc="best", ncol=2)
