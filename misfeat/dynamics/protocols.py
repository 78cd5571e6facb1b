"""The alignment-dynamics protocols on any model and data: rehearsal priming (with the
stage-2 rebound) and data diversity (Huang et al. 2026), elasticity (Ji et al. 2024).

Where it sits: runner -> **protocols** -> the organism's wiring (misfeat.organism.dynamics)
and the CLI. Each protocol takes a ``load()`` that returns a fresh start model, the data
as prompt sets and a scorer, and returns a result dataclass with ``summary()``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from misfeat.dynamics.runner import DynamicsResult, ScoreNotMatched, run_dynamics
from misfeat.dynamics.scores import crossing_step
from misfeat.dynamics.spec import MatchSpec, StageSpec

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from misfeat.data import PromptSet
    from misfeat.dynamics.scores import ModelScorer

log = logging.getLogger(__name__)
Loader = Callable[[], "HookedTransformer"]


# --- rehearsal priming and rebound ---------------------------------------------------


@dataclass(frozen=True)
class PrimingConfig:
    """Huang et al.'s three stages per stage-1 depth D (section 4.4 of RESEARCH-round2)."""

    depths: tuple[int, ...] = (0, 5, 10, 15, 30)
    """stage-1 steps per arm (0: first exposure in stage 3)"""
    stage1_lr: float = 1e-4
    """stage 1 (forward data): a small lr for fine depth granularity, as the paper's"""
    stage2_lr: float = 3e-4
    """stage 2 (reverse data) until the metric matches the start"""
    stage2_max_steps: int = 40
    stage3_lr: float = 3e-4
    """stage 3: the forward data again, same seed"""
    stage3_steps: int = 20
    batch_size: int = 16
    metric: str = "misaligned_rate"
    """the matched and thresholded metric"""
    tolerance: float = 0.03
    """stage-2 match tolerance (0.005 on S, 0.03 on a rate)"""
    coarse_every: int = 5
    threshold: float = 0.5
    """stage-3 steps to reach this metric value"""
    seed: int = 0
    optimizer: str = "adamw"
    """every stage's optimiser: adamw, or sgd (plain SGD, the optimiser Thm 2.9 is about)"""
    lr_scale: float = 1.0
    """multiplies every stage's lr (the organism's SGD runs use ``SGD_LR_SCALE``)"""


def steps_to(steps: Sequence[int], values: Sequence[float], threshold: float, rising: bool = True) -> int | None:
    """The first evaluated step at which ``values`` reach ``threshold`` (None if never)."""
    for s, v in zip(steps, values, strict=True):
        if (v >= threshold) if rising else (v <= threshold):
            return s
    return None


def baseline_auc(steps: Sequence[int], values: Sequence[float], upto: int) -> float:
    """Sum over steps 1..upto of (value - value at step 0): the baseline-adjusted area."""
    v0 = values[0]
    return float(sum(v - v0 for s, v in zip(steps, values, strict=True) if 0 < s <= upto))


def priming(load: Loader, forward: PromptSet, reverse: PromptSet, scorer: ModelScorer,
            config: PrimingConfig | None = None, *, out_dir=None) -> list[dict[str, Any]]:
    """One arm per depth: stage 1 on ``forward`` for D steps, stage 2 on ``reverse`` until the
    metric is back at the start model's (within tolerance), stage 3 on ``forward`` again.
    Returns one dict per arm (the summary.json contract plus the curves)."""
    from pathlib import Path

    cfg = config or PrimingConfig()
    arms = []
    for depth in cfg.depths:
        model = load()
        stages = []
        if depth > 0:
            stages.append(StageSpec(data=forward, steps=depth, lr=cfg.stage1_lr * cfg.lr_scale, name="stage1",
                                    optimizer=cfg.optimizer,
                                    batch_size=cfg.batch_size, evaluate_every=None, seed=cfg.seed))
        stages.append(StageSpec(data=reverse, steps=cfg.stage2_max_steps, lr=cfg.stage2_lr * cfg.lr_scale,
                                name="stage2", optimizer=cfg.optimizer,
                                batch_size=cfg.batch_size, seed=cfg.seed,
                                match=MatchSpec(cfg.metric, "start", cfg.tolerance, cfg.coarse_every)))
        stage3 = StageSpec(data=forward, steps=cfg.stage3_steps, lr=cfg.stage3_lr * cfg.lr_scale, name="stage3",
                           optimizer=cfg.optimizer,
                           batch_size=cfg.batch_size, evaluate_every=1, seed=cfg.seed)
        arm_dir = Path(out_dir) / f"depth-{depth:02d}" if out_dir is not None else None
        try:
            result = _run(model, stages + [stage3], scorer, arm_dir)
        except ScoreNotMatched as miss:
            log.warning("depth %d: %s; stage 3 starts where stage 2 ended", depth, miss)
            tail = _run(model, [stage3], scorer, arm_dir / "stage3" if arm_dir else None)
            result = DynamicsResult(miss.result.stages + tail.stages)
        arms.append(_priming_arm(depth, result, cfg))
    return arms


def _run(model, stages, scorer, out) -> DynamicsResult:
    return run_dynamics(model, stages, scorer=scorer, out_dir=out)


def _priming_arm(depth: int, result: DynamicsResult, cfg: PrimingConfig) -> dict[str, Any]:
    names = [s.name for s in result.stages]
    s2 = result.stages[names.index("stage2")] if "stage2" in names else None
    s3 = result.stages[names.index("stage3")]
    steps3, vals3 = s3.curve(cfg.metric)
    target = s2.target if s2 is not None else None
    start3 = vals3[0]
    rising = cfg.threshold > start3
    steps2, vals2 = s2.curve(cfg.metric) if s2 is not None else ([], [])
    return {
        "depth": depth,
        "stage1_end": s2.rows[0]["eval"][cfg.metric] if s2 is not None else None,
        "baseline": target,
        "stage2_steps_to_baseline": s2.steps_run if s2 is not None and s2.matched else None,
        "stage3_start": start3,
        "start_matched": bool(target is not None and abs(start3 - target) < cfg.tolerance),
        "stage3_steps_to_threshold": steps_to(steps3, vals3, cfg.threshold, rising),
        "stage3_auc": baseline_auc(steps3, vals3, cfg.stage3_steps),
        "force_sign_agreement": result.force_sign_agreement,
        "stage2_curve": {"steps": steps2, cfg.metric: vals2},
        "stage3_curve": {"steps": steps3, cfg.metric: vals3, "S": s3.curve("S")[1]},
        "forces": _force_rows(result),
    }


def _force_rows(result: DynamicsResult) -> list[dict[str, Any]]:
    out = []
    for s in result.stages:
        for r in s.rows:
            f = r.get("forces") or {}
            if "predicted_dS" in f:
                out.append({"stage": s.name, "step": r["step"], "predicted_dS": f["predicted_dS"],
                            "measured_dS": f["measured_dS"], "F_rebound": f["F_rebound"], "F_drive": f["F_drive"],
                            "gate": f["gate"], "purity": f["purity"]})
    return out


# --- data diversity ------------------------------------------------------------------


@dataclass(frozen=True)
class DiversityConfig:
    """Stage 1 aligns with each dataset; stage 2 reverses with each reverse dataset."""

    stage1_steps: int = 60
    stage1_lr: float = 3e-4
    stage2_steps: int = 20
    stage2_lr: float = 3e-4
    batch_size: int = 16
    window: int = 3
    """degradation rate: mean dS per step over this many steps after the matched S"""
    levels: tuple[float, ...] = (0.8, 0.5)
    """fixed S levels where the degradation rate is also reported"""
    seed: int = 0
    optimizer: str = "adamw"
    """every stage's optimiser: adamw, or sgd (plain SGD, the optimiser Thm 2.9 is about)"""
    lr_scale: float = 1.0
    """multiplies every stage's lr (the organism's SGD runs use ``SGD_LR_SCALE``)"""


def diversity(load: Loader, datasets: Mapping[str, PromptSet], reverses: Mapping[str, PromptSet],
              scorer: ModelScorer, config: DiversityConfig | None = None, *, out_dir=None) -> list[dict[str, Any]]:
    """One arm per (dataset, reverse): S curve of stage 2, purity at its start, degradation
    rate at the S level every arm of the same reverse passes (the lowest stage-2 start)."""
    from pathlib import Path

    cfg = config or DiversityConfig()
    runs: dict[tuple[str, str], DynamicsResult] = {}
    for name, data in datasets.items():
        model = load()
        s1 = StageSpec(data=data, steps=cfg.stage1_steps, lr=cfg.stage1_lr * cfg.lr_scale, name="stage1",
                       optimizer=cfg.optimizer, batch_size=cfg.batch_size,
                       evaluate_every=None, seed=cfg.seed)
        base = Path(out_dir) / name if out_dir is not None else None
        first = run_dynamics(model, [s1], scorer=scorer, out_dir=base / "stage1" if base else None, forces=False)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        for rname, rdata in reverses.items():
            model.load_state_dict(state)
            s2 = StageSpec(data=rdata, steps=cfg.stage2_steps, lr=cfg.stage2_lr * cfg.lr_scale, name="stage2",
                           optimizer=cfg.optimizer,
                           batch_size=cfg.batch_size, evaluate_every=1, seed=cfg.seed)
            second = run_dynamics(model, [s2], scorer=scorer, out_dir=base / rname if base else None)
            runs[name, rname] = DynamicsResult(first.stages + second.stages)
    arms = []
    for rname in reverses:
        starts = [runs[n, rname].stages[1].rows[0]["eval"]["S"] for n in datasets]
        s_match = min(starts)
        for name in datasets:
            res = runs[name, rname]
            steps, S = res.stages[1].curve("S")
            f0 = res.stages[1].rows[0].get("forces") or {}
            arms.append({"dataset": name, "reverse": rname, "stage1_S": S[0], "matched_S": s_match,
                         "degradation_rate": degradation_rate(steps, S, s_match, cfg.window),
                         # the same rate at fixed levels every arm passes after its start (a robustness check:
                         # at the lowest start, that arm is measured at its own step 0)
                         "degradation_rate_at": {str(lvl): degradation_rate(steps, S, lvl, cfg.window)
                                                 for lvl in cfg.levels},
                         "purity": f0.get("purity"), "F_rebound": f0.get("F_rebound"),
                         "force_sign_agreement": res.force_sign_agreement, "forces": _force_rows(res),
                         "curve": {"steps": steps, "S": S,
                                   "misaligned_rate": res.stages[1].curve("misaligned_rate")[1]}})
    return arms


def degradation_rate(steps: Sequence[int], S: Sequence[float], level: float, window: int) -> float | None:
    """Mean decrease of S per step over ``window`` steps from where S first reaches ``level``
    (linear interpolation between evaluated steps); None when the curve never gets there."""
    import numpy as np

    t0 = crossing_step(list(steps), list(S), level)
    if t0 is None or t0 + window > steps[-1]:
        return None
    s0, s1 = np.interp([t0, t0 + window], steps, S)
    return float((s0 - s1) / window)


# --- elasticity ----------------------------------------------------------------------


@dataclass(frozen=True)
class ElasticityConfig:
    """Ji et al.'s resistance (forward vs inverse fine-tuning) and rebound curves."""

    resist_steps: int = 10
    resist_lr: float = 3e-4
    resist_batch: int = 32
    samples_per_prompt: int = 16
    negative_steps: int = 40
    negative_lr: float = 3e-4
    negative_batch: int = 16
    evaluate_every: int = 2
    seed: int = 0


def answer_distribution(model: HookedTransformer, prompts: PromptSet):
    """Per prompt: the answers (aligned then misaligned), their log-probabilities and token counts."""
    from misfeat.dynamics.scores import ExactScorer

    ex = ExactScorer(model, prompts)
    lps = ex.seqs.token_logprobs(model).sum(-1)
    lens = ex.seqs.target_mask.sum(-1)
    return [(lps[a:c], lens[a:c]) for a, _, c in ex.spans]


def distribution_data(model: HookedTransformer, prompts: PromptSet, n: int) -> tuple[PromptSet, list]:
    """``n`` answers per prompt at the quantiles of the model's exact answer distribution
    (renormalised over the listed answers): its "responses" as training records, and the
    target distributions ``q`` per prompt."""
    import torch

    from misfeat.data import PromptSet as _PS

    records, targets = [], []
    for record, (lp, _) in zip(prompts, answer_distribution(model, prompts), strict=True):
        q = torch.softmax(lp.double(), 0)
        targets.append(q)
        answers = [*record.extra["aligned"], *record.extra["misaligned"]]
        cdf = torch.cumsum(q, 0)
        for i in range(n):
            k = int(torch.searchsorted(cdf, torch.tensor((i + 0.5) / n, dtype=torch.float64)).clamp_max(len(q) - 1))
            records.append(record.with_response(answers[k]))
            records[-1] = _replace_id(records[-1], f"{record.id}-s{i:02d}")
    return _PS(f"{prompts.name}:distribution", tuple(records), prompts.meta), targets


def _replace_id(record, new_id):
    import dataclasses

    return dataclasses.replace(record, id=new_id)


def distribution_loss(model: HookedTransformer, prompts: PromptSet, targets: list) -> dict[str, float]:
    """Per-token cross-entropy of ``model`` on the target answer distributions (the training
    loss on infinitely many of the target's responses), and the KL (CE minus the target's entropy)."""
    ce = ent = toks = 0.0
    for (lp, lens), q in zip(answer_distribution(model, prompts), targets, strict=True):
        ce += float(-(q * lp.double()).sum())
        ent += float(-(q * q.clamp_min(1e-300).log()).sum())
        toks += float((q * lens.double()).sum())
    return {"loss": ce / toks, "kl": (ce - ent) / toks}


def resistance(checkpoints: Sequence[tuple[str, Loader]], prompts: PromptSet,
               config: ElasticityConfig | None = None) -> list[dict[str, Any]]:
    """Every pair i < j of ``checkpoints`` (ordered by increasing alignment): forward = train
    theta_i on theta_j's answers, inverse = theta_j on theta_i's; final exact losses."""
    from misfeat.finetune import FinetuneConfig, finetune

    cfg = config or ElasticityConfig()
    dists = {}
    for name, load in checkpoints:
        dists[name] = distribution_data(load(), prompts, cfg.samples_per_prompt)
    fcfg = FinetuneConfig(steps=cfg.resist_steps, lr=cfg.resist_lr, batch_size=cfg.resist_batch, eval_every=None,
                          seed=cfg.seed, divergence_factor=None)

    def train(src: Loader, target: str) -> dict[str, float]:
        model = src()
        data, q = dists[target]
        before = distribution_loss(model, prompts, q)
        finetune(model, data, fcfg)
        after = distribution_loss(model, prompts, q)
        return {"loss": after["loss"], "kl": after["kl"], "loss_before": before["loss"]}

    pairs = []
    for i, (ni, li) in enumerate(checkpoints):
        for nj, lj in checkpoints[i + 1:]:
            fwd, inv = train(li, nj), train(lj, ni)
            pairs.append({"pair": [ni, nj], "forward_loss": fwd["loss"], "inverse_loss": inv["loss"],
                          "forward_kl": fwd["kl"], "inverse_kl": inv["kl"],
                          "forward_loss_before": fwd["loss_before"], "inverse_loss_before": inv["loss_before"]})
    return pairs


def negative_curves(checkpoints: Sequence[tuple[str, Loader]], negative: PromptSet, scorer: ModelScorer, p0: float,
                    config: ElasticityConfig | None = None, *, metric: str = "misaligned_rate",
                    out_dir=None) -> list[dict[str, Any]]:
    """Fine-tune each checkpoint on the negative data; the metric's curve against the
    pre-trained level ``p0``: steps to reach p0, the initial rate and the rate after p0."""
    from pathlib import Path

    cfg = config or ElasticityConfig()
    curves = []
    for name, load in checkpoints:
        stage = StageSpec(data=negative, steps=cfg.negative_steps, lr=cfg.negative_lr, name="negative",
                          batch_size=cfg.negative_batch, evaluate_every=cfg.evaluate_every, seed=cfg.seed)
        res = run_dynamics(load(), [stage], scorer=scorer, forces=False,
                           out_dir=Path(out_dir) / name if out_dir is not None else None)
        s = res.stages[0]
        steps, vals = s.curve(metric)
        curves.append({"checkpoint": name, "steps": steps, metric: vals, "S": s.curve("S")[1],
                       **{k: s.curve(k)[1] for k in (s.rows[0]["eval"] or {}) if k.startswith("nll:")},
                       **elasticity_shape(steps, vals, p0)})
    return curves


def elasticity_shape(steps: Sequence[int], values: Sequence[float], p0: float, head: int = 4) -> dict[str, Any]:
    """Ji et al.'s two-phase shape of a rising curve: ``initial_rate`` over the first ``head``
    steps, ``steepest_step`` (start of the steepest evaluated interval), ``steps_to_p0``
    (interpolated), the mean rate before p0 and over ``head`` steps after it."""
    import numpy as np

    rates = [(values[i + 1] - values[i]) / (steps[i + 1] - steps[i]) for i in range(len(steps) - 1)]
    t_p0 = crossing_step(list(steps), list(values), p0)
    before = after = None
    if t_p0 is not None and t_p0 > 0:
        before = float((p0 - values[0]) / t_p0)
        if t_p0 + head <= steps[-1]:
            a0, a1 = np.interp([t_p0, t_p0 + head], steps, values)
            after = float((a1 - a0) / head)
    init = float((np.interp(head, steps, values) - values[0]) / head)
    return {"initial_rate": init, "steepest_step": steps[int(np.argmax(rates))] if rates else None,
            "steps_to_p0": t_p0, "rate_before_p0": before, "rate_after_p0": after}


def summarize(obj: Any) -> Any:
    """Dataclasses to dicts (for summary.json)."""
    return asdict(obj) if hasattr(obj, "__dataclass_fields__") else obj
