"""Alignment dynamics: how alignment moves during fine-tuning, measured step by step.

    from misfeat.dynamics import run_dynamics, RunSpec, StageSpec, MatchSpec, ModelScorer
    result = run_dynamics(model, RunSpec.load("stages.json"), out_dir="runs/dyn")

Modules: ``scores`` (Huang's S exact or judged, rates, per-token NLL), ``forces`` (Huang
et al. 2026 Theorem 2.9 with K = I, exactly per position), ``spec`` (stages and score
matching), ``runner`` (stages on the fine-tuning engine), ``protocols`` (rehearsal
priming, data diversity, elasticity on any model and data). See docs/dynamics.md.
Importing this package imports no torch.
"""

from misfeat.dynamics.forces import (
    ForceProbe,
    ForceSnapshot,
    PositionForces,
    position_forces,
    sign_agreement,
)
from misfeat.dynamics.runner import (
    DynamicsResult,
    ScoreNotMatched,
    StageResult,
    plot_dynamics,
    run_dynamics,
)
from misfeat.dynamics.scores import (
    ExactScorer,
    ModelScorer,
    NLLScorer,
    Scores,
    crossing_step,
    judge_scores,
    missing_answer_sets,
    scores_from_logprobs,
)
from misfeat.dynamics.spec import MatchSpec, RunSpec, StageSpec

__all__ = [
    "DynamicsResult", "ExactScorer", "ForceProbe", "ForceSnapshot", "MatchSpec", "ModelScorer", "NLLScorer",
    "PositionForces", "RunSpec", "ScoreNotMatched", "Scores", "StageResult", "StageSpec", "crossing_step",
    "judge_scores", "missing_answer_sets", "plot_dynamics", "position_forces", "run_dynamics", "scores_from_logprobs",
    "sign_agreement",
]
