"""The multi-stage dynamics runner: stages on misfeat's one fine-tuning engine, each starting
from the previous one's end, with score matching, per-step scores and force terms.

Where it sits: scores + forces + :func:`misfeat.finetune.finetune` -> **runner** -> protocols.

Per stage the engine trains; the runner's ``on_step`` measures the scores (every
``evaluate_every`` steps) and the force terms (every step), and stops a matching stage at
its first step within tolerance of the target. Matching (Huang et al. 2026, B.2.2) is two
passes over the same deterministic trajectory: a coarse pass evaluating every
``coarse_every`` steps until the metric reaches the target, then a replay from the stage's
start evaluating every step inside the last coarse window.

Run directory::

    DIR/summary.json               stages (start, steps run, matched step/score), force sign agreement
    DIR/steps.jsonl                one row per step: stage, step, global step, loss, lr, eval, forces
    DIR/plot.png                   the scores against the global step, stage boundaries marked
    DIR/stages/<i>-<name>/         the engine's run directory (run.json, rows.jsonl, checkpoints/), and
                                   stage.json once the stage is done (resume skips it); coarse/ for matching
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from misfeat.data import load_prompts
from misfeat.dynamics.forces import ForceProbe, sign_agreement
from misfeat.dynamics.scores import ModelScorer
from misfeat.dynamics.spec import RunSpec, StageSpec
from misfeat.errors import MisfeatError

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

log = logging.getLogger(__name__)
STAGE_FILE = "stage.json"
STEPS_FILE = "steps.jsonl"
PARTIAL_FILE = "dynamics_rows.jsonl"


@dataclass(frozen=True)
class StageResult:
    """One stage: where it started (``start_global``), how many steps ran, the matching outcome
    (``matched`` None without matching), its end checkpoint, and its rows (``step`` 0 = the
    start; each row: step, global_step, loss, lr, eval, forces)."""

    name: str
    index: int
    start_global: int
    steps_run: int
    matched: bool | None
    target: float | None
    match_value: float | None
    checkpoint: str | None
    rows: tuple[dict[str, Any], ...]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rows": list(self.rows)}

    def curve(self, metric: str) -> tuple[list[int], list[float]]:
        """``(local steps, values)`` of an evaluated metric."""
        pts = [(r["step"], r["eval"][metric]) for r in self.rows if r.get("eval") and metric in r["eval"]]
        return [p[0] for p in pts], [p[1] for p in pts]

    def forces(self, key: str) -> list[float | None]:
        return [r["forces"].get(key) if r.get("forces") else None for r in self.rows if r["step"] > 0]


@dataclass(frozen=True)
class DynamicsResult:
    """Every stage's result; ``force_sign_agreement`` over all steps with force terms."""

    stages: tuple[StageResult, ...]

    @property
    def force_sign_agreement(self) -> float | None:
        pred = [p for s in self.stages for p in s.forces("predicted_dS")]
        meas = [m for s in self.stages for m in s.forces("measured_dS")]
        return sign_agreement(pred, meas)

    def stage(self, name: str) -> StageResult:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)

    def summary(self) -> dict[str, Any]:
        return {"stages": [{k: v for k, v in s.to_dict().items() if k != "rows"}
                           | {"start": s.rows[0].get("eval"), "end": _last_eval(s)} for s in self.stages],
                "force_sign_agreement": self.force_sign_agreement}

    def table(self) -> str:
        from misfeat.io import format_table

        rows = [{"stage": s.name, "start": s.start_global, "steps": s.steps_run, "matched": s.matched,
                 **{k: v for k, v in (_last_eval(s) or {}).items() if not k.startswith("nll:")}} for s in self.stages]
        return format_table(rows) + f"\nforce sign agreement: {self.force_sign_agreement}"

    def steps(self) -> list[dict[str, Any]]:
        return [{"stage": s.name, **r} for s in self.stages for r in s.rows]


def _last_eval(stage: StageResult) -> dict[str, float] | None:
    evals = [r["eval"] for r in stage.rows if r.get("eval")]
    return evals[-1] if evals else None


class ScoreNotMatched(MisfeatError):
    """A matching stage never came within tolerance of its target; the run is kept on disk."""

    def __init__(self, message: str, result: DynamicsResult, closest: float, closest_step: int):
        super().__init__(message)
        self.result, self.closest, self.closest_step = result, closest, closest_step


def run_dynamics(model: HookedTransformer, spec: RunSpec | Sequence[StageSpec], *,
                 scorer: ModelScorer | None = None, judge: Any = None, out_dir: str | os.PathLike | None = None,
                 resume: bool = False, forces: bool | None = None, forces_every: int | None = None) -> DynamicsResult:
    """Run the stages of ``spec`` on ``model`` (trained in place), each from the previous end.

    ``scorer`` (default: a :class:`ModelScorer` of ``spec.eval_prompts``, exact or through
    ``judge``) gives the metrics; ``forces`` (default ``spec.forces``) logs Huang's force
    terms every ``forces_every`` steps (default ``spec.forces_every``, 1). Raises :class:`ScoreNotMatched` (the run kept) when a matching stage
    never reaches its target.
    """
    from misfeat.judges import make_judge

    if not isinstance(spec, RunSpec):
        spec = RunSpec(tuple(spec))
    forces = spec.forces if forces is None else forces
    forces_every = spec.forces_every if forces_every is None else forces_every
    if forces_every < 1:
        raise MisfeatError(f"forces_every must be >= 1, got {forces_every}")
    if scorer is None:
        if spec.eval_prompts is None:
            raise MisfeatError("a dynamics run needs eval_prompts (or a scorer) to measure the model")
        if judge is None and spec.judge is not None:
            judge = make_judge(spec.judge)
        scorer = ModelScorer(model, spec.eval_prompts, judge=judge, nll_sets=spec.nll_sets)
    datas = [load_prompts(s.data) for s in spec.stages]
    for stage, data in zip(spec.stages, datas, strict=True):
        bad = [r.id for r in data if not r.response]
        if bad:
            raise MisfeatError(f"stage {stage.name or stage.data!r}: {len(bad)} records have no 'response' "
                               f"(first {bad[0]!r}); every training record needs one")
    probes = [ForceProbe(model, d) if forces else None for d in datas]
    start = scorer(model).metrics()
    for stage in spec.stages:
        if stage.match is not None and stage.match.metric not in start:
            raise MisfeatError(f"stage {stage.name!r} matches {stage.match.metric!r}, which the scorer does not "
                               f"measure; choose one of {', '.join(sorted(start))}")
    out = Path(out_dir) if out_dir is not None else None
    results: list[StageResult] = []
    now, offset = start, 0
    for i, (stage, data) in enumerate(zip(spec.stages, datas, strict=True)):
        name = stage.name or f"stage{i}"
        sdir = out / "stages" / f"{i}-{name}" if out is not None else None
        if resume and sdir is not None and (sdir / STAGE_FILE).is_file():
            result = _load_stage(sdir, model)
        else:
            try:
                result = _run_stage(model, stage, name, i, data, scorer, probes[i], sdir, resume, offset, now,
                                    start, forces_every)
            except _NotMatched as miss:
                results.append(miss.result)
                partial = DynamicsResult(tuple(results))
                if out is not None:
                    _write_run(out, partial, spec)
                raise ScoreNotMatched(miss.message, partial, miss.closest, miss.closest_step) from None
            if sdir is not None:
                from misfeat.io import write_json

                write_json(sdir / STAGE_FILE, result.to_dict())
        results.append(result)
        offset += result.steps_run
        now = _last_eval(result) or now
        if out is not None:
            _write_run(out, DynamicsResult(tuple(results)), spec)
    return DynamicsResult(tuple(results))


class _NotMatched(Exception):
    def __init__(self, message: str, result: StageResult, closest: float, closest_step: int):
        self.message, self.result, self.closest, self.closest_step = message, result, closest, closest_step


def _load_stage(sdir: Path, model) -> StageResult:
    from misfeat.io import read_json
    from misfeat.models import load_model

    obj = read_json(sdir / STAGE_FILE)
    result = StageResult(**{**obj, "rows": tuple(obj["rows"])})
    if result.checkpoint:
        model.load_state_dict(load_model(result.checkpoint, device=model.cfg.device).state_dict())
    log.info("stage %s already done in %s; resumed after it", result.name, sdir)
    return result


def _run_stage(model, stage: StageSpec, name: str, index: int, data, scorer, probe, sdir, resume, offset,
               now: dict[str, float], start: dict[str, float], forces_every: int = 1) -> StageResult:
    """One stage (two passes when it matches a score); the model ends at the stage's end."""
    match = stage.match
    if match is None:
        rows, res = _pass(model, stage, stage.steps, data, scorer, probe, sdir, resume, offset, now,
                          every=stage.evaluate_every, forces_every=forces_every)
        return StageResult(name, index, offset, rows[-1]["step"], None, None, None, _ckpt(res), tuple(rows))
    metric, tol = match.metric, match.tol
    target = start[metric] if match.target == "start" else float(match.target)
    above = now[metric] > target

    def reached(value: float) -> bool:
        return abs(value - target) < tol or (value <= target if above else value >= target)

    row0 = {"step": 0, "global_step": offset, "loss": None, "lr": None, "eval": now, "forces": None}
    if abs(now[metric] - target) < tol:
        return StageResult(name, index, offset, 0, True, target, now[metric], None, (row0,))
    state0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    coarse_rows, res = _pass(model, stage, stage.steps, data, scorer, None, sdir / "coarse" if sdir else None,
                             resume, offset, now, every=match.coarse_every, stop=lambda v: reached(v[metric]))
    evals = [(r["step"], r["eval"][metric]) for r in coarse_rows if r.get("eval")]
    if not res.stopped_early and not reached(evals[-1][1]):
        best = min(evals, key=lambda p: abs(p[1] - target))
        where = f"; the run is kept in {sdir}" if sdir is not None else ""
        msg = (f"stage {name!r}: {metric} never came within {tol} of the target {target:.4g} in {stage.steps} "
               f"steps; the closest was {best[1]:.4g} at step {best[0]} (evaluated every {match.coarse_every} "
               f"steps){where}. Raise steps or lr, or widen the tolerance")
        raise _NotMatched(msg, StageResult(name, index, offset, coarse_rows[-1]["step"], False, target, best[1],
                                           _ckpt(res), tuple(coarse_rows)), best[1], best[0])
    end = evals[-1][0]
    window = max(0, end - match.coarse_every)
    model.load_state_dict(state0)
    rows, res = _pass(model, stage, end, data, scorer, probe, sdir, False, offset, now, every=None,
                      every_after=window, stop=lambda v: reached(v[metric]), forces_every=forces_every)
    value = rows[-1]["eval"][metric]
    return StageResult(name, index, offset, rows[-1]["step"], abs(value - target) < tol, target, value, _ckpt(res),
                       tuple(rows))


def _ckpt(res) -> str | None:
    return res.checkpoints[-1] if res.checkpoints else None


def _pass(model, stage: StageSpec, steps: int, data, scorer, probe, out, resume, offset, now, *, every,
          every_after: int | None = None, stop=None, forces_every: int = 1):
    """One engine run of ``steps``; scores at evaluation steps (every ``every``, the last, and
    every step after ``every_after``), forces every ``forces_every`` steps (and the last) when ``probe``; ``stop(metrics)``
    ends the run at an evaluated step."""
    from misfeat.finetune import FinetuneConfig, finetune

    cfg = FinetuneConfig(steps=steps, lr=stage.lr, optimizer=stage.optimizer, batch_size=stage.batch_size,
                         eval_every=None,
                         checkpoint_every=stage.checkpoint_every if every_after is None else None,
                         seed=stage.seed, divergence_factor=None)
    rows = [{"step": 0, "global_step": offset, "loss": None, "lr": None, "eval": now, "forces": None}]
    snap = [probe.measure(model)] if probe is not None else None
    lr_sum = [0.0]   # summed lr since the last force measurement
    if snap:
        rows[0]["forces"] = {"S_train": snap[0].S_train, **_force_fields(snap[0])}
    partial = out / PARTIAL_FILE if out is not None else None
    if resume and partial is not None and partial.is_file():
        import json

        rows = [json.loads(line) for line in partial.read_text().splitlines() if line.strip()]
        if snap:
            snap[0] = None  # the state before the first resumed step is not at hand: no prediction for it

    def on_step(m, row) -> bool:
        step = row.step
        del rows[next((i for i, r in enumerate(rows) if r["step"] >= step), len(rows)):]
        evaluate = (step == steps or (every is not None and step % every == 0)
                    or (every_after is not None and step > every_after))
        metrics = scorer(m).metrics() if evaluate else None
        forces = None
        if snap is not None:
            lr_sum[0] += row.lr or stage.lr
        if snap is not None and (step % forces_every == 0 or step == steps):
            new, before = probe.measure(m), snap[0]
            forces = {"S_train": new.S_train, **_force_fields(new)}
            if before is not None:
                forces.update(measured_dS=new.S_train - before.S_train, predicted_dS=lr_sum[0] * before.rate)
            snap[0], lr_sum[0] = new, 0.0
        rows.append({"step": step, "global_step": offset + step, "loss": row.loss, "lr": row.lr, "eval": metrics,
                     "forces": forces})
        if partial is not None:
            from misfeat.io import write_jsonl

            write_jsonl(partial, rows)
        return bool(metrics is not None and stop is not None and stop(metrics))

    res = finetune(model, data, cfg, on_step=on_step, out_dir=out, resume=resume)
    return rows, res


def _force_fields(snap) -> dict[str, float]:
    return {"rate": snap.rate, "gate": snap.gate, "F_rebound": snap.F_rebound, "F_drive": snap.F_drive,
            "purity": snap.purity}


def _write_run(out: Path, result: DynamicsResult, spec: RunSpec) -> None:
    from misfeat.io import SUMMARY_FILE, write_json, write_jsonl

    write_jsonl(out / STEPS_FILE, result.steps())
    write_json(out / SUMMARY_FILE, {"spec": spec.to_dict(), **result.summary()})


def plot_dynamics(result: DynamicsResult, path: str | os.PathLike, metrics: Sequence[str] = ("S", "misaligned_rate"),
                  title: str = "alignment dynamics") -> Path:
    """The evaluated ``metrics`` against the global step, one colour per metric, stage starts marked."""
    from misfeat.plots import figure

    with figure(path, size=(7, 3.6)) as ax:
        for k, metric in enumerate(metrics):
            xs, ys = [], []
            for s in result.stages:
                steps, vals = s.curve(metric)
                xs += [s.start_global + t for t in steps]
                ys += vals
            if xs:
                ax.plot(xs, ys, marker=".", color=f"C{k}", label=metric)
        for s in result.stages[1:]:
            ax.axvline(s.start_global, color="grey", lw=0.8, ls=":")
        for s in result.stages:
            ax.text(s.start_global, 1.02, s.name, fontsize=7, transform=ax.get_xaxis_transform())
        ax.set_xlabel("global step")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(title, fontsize=9, pad=14)
        ax.legend(fontsize=8)
    return Path(path)
