"""What a multi-stage dynamics run is made of: stages, score matching, the run file.

A stage file (JSON) names the start model, the scoring prompts and the stages; each stage
starts from the previous one's end::

    {"model": "organism:chat", "eval_prompts": "organism:heldout", "forces": true,
     "stages": [
       {"name": "forward", "data": "organism:misaligned:health:480", "steps": 10, "lr": 1e-4},
       {"name": "reverse", "data": "organism:aligned:health:480", "steps": 40, "lr": 3e-4,
        "match": {"metric": "misaligned_rate", "target": "start", "tolerance": 0.03, "coarse_every": 5}},
       {"name": "re-exposure", "data": "organism:misaligned:health:480", "steps": 20, "evaluate_every": 1}]}

Unknown keys are refused with the list of known ones.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from misfeat.errors import MisfeatError


def _from_dict(cls, obj: Any, where: str):
    if not isinstance(obj, dict):
        raise MisfeatError(f"{where} must be an object with keys {', '.join(f.name for f in dataclasses.fields(cls))}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(obj) - known)
    if unknown:
        raise MisfeatError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; the known keys are "
                           f"{', '.join(sorted(known))}")
    try:
        return cls(**obj)
    except TypeError as err:
        raise MisfeatError(f"{where}: {err}") from None


@dataclass(frozen=True)
class MatchSpec:
    """Score matching for a stage's end (Huang et al. 2026, B.2.2): evaluate every
    ``coarse_every`` steps until the metric reaches the target, then replay that window
    evaluating every step, and stop at the first step within ``tolerance`` of the target."""

    metric: str = "S"
    """the evaluated metric to match (S, misaligned_rate, valid_rate, ...)"""
    target: float | str = "start"
    """a number, or "start": the metric of the run's start model"""
    tolerance: float | None = None
    """|metric - target| below this counts as matched (default 0.005 for S, 0.03 for a rate)"""
    coarse_every: int = 5
    """evaluate every k steps while searching for the window"""

    def __post_init__(self) -> None:
        if not (isinstance(self.target, (int, float)) or self.target == "start"):
            raise MisfeatError(f"match.target must be a number or \"start\", got {self.target!r}")
        if self.tolerance is not None and not self.tolerance > 0:
            raise MisfeatError(f"match.tolerance must be positive, got {self.tolerance}")
        if self.coarse_every < 1:
            raise MisfeatError("match.coarse_every must be >= 1")

    @property
    def tol(self) -> float:
        return self.tolerance if self.tolerance is not None else (0.005 if self.metric == "S" else 0.03)


@dataclass(frozen=True)
class StageSpec:
    """One fine-tuning stage of a dynamics run (it starts from the previous stage's end)."""

    data: Any
    """training records with responses: a JSONL file or a prompt-set spec (or, from Python, a PromptSet)"""
    steps: int
    """optimiser steps (with ``match``: the most steps to search)"""
    lr: float = 3e-4
    """constant learning rate"""
    optimizer: str = "adamw"
    """adamw or sgd (plain SGD, the optimiser Huang et al.'s first-order force theory is about)"""
    name: str = ""
    """a label for plots and directories (default stage<i>)"""
    batch_size: int = 16
    """examples per step"""
    evaluate_every: int | None = 1
    """evaluate every k steps (and at the start and end); None: start and end only"""
    checkpoint_every: int | None = None
    """also keep a checkpoint every k steps (the end is always kept)"""
    seed: int = 0
    """data-order seed"""
    match: MatchSpec | None = None
    """stop at the first step whose score matches a target (see MatchSpec)"""

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise MisfeatError(f"stage {self.name or str(self.data)!r}: steps and batch_size must be positive")
        if not self.lr > 0:
            raise MisfeatError(f"stage {self.name or str(self.data)!r}: lr must be positive")
        if self.optimizer not in ("adamw", "sgd"):
            raise MisfeatError(f"stage {self.name or str(self.data)!r}: optimizer must be adamw or sgd, "
                               f"got {self.optimizer!r}")
        if self.evaluate_every is not None and self.evaluate_every < 1:
            raise MisfeatError(f"stage {self.name or str(self.data)!r}: evaluate_every must be >= 1 (or null)")

    @classmethod
    def from_dict(cls, obj: Any, where: str = "stage") -> StageSpec:
        if isinstance(obj, dict) and isinstance(obj.get("match"), dict):
            obj = {**obj, "match": _from_dict(MatchSpec, obj["match"], f"{where}.match")}
        return _from_dict(cls, obj, where)


@dataclass(frozen=True)
class RunSpec:
    """A multi-stage run: start model, scoring, stages."""

    stages: tuple[StageSpec, ...]
    model: str | None = None
    """start model spec (the CLI loads it; the Python API takes a model)"""
    eval_prompts: str | None = None
    """scoring prompts (records with aligned/misaligned answer lists for the exact S)"""
    nll_sets: dict[str, str] = field(default_factory=dict)
    """held-out sets whose per-token NLL is logged at each evaluation, {name: spec}"""
    judge: str | None = None
    """exact or llm: scores S by sampling when eval_prompts have no answer lists"""
    forces: bool = True
    """log Huang's force terms and S on the training prompts (needs aligned lists in the data)"""
    forces_every: int = 1
    """measure the force terms every k steps (predicted dS over a window: the summed lr x the rate at its start)"""

    def __post_init__(self) -> None:
        if not self.stages:
            raise MisfeatError("a dynamics run needs at least one stage")
        if self.forces_every < 1:
            raise MisfeatError(f"forces_every must be >= 1, got {self.forces_every}")

    @classmethod
    def from_dict(cls, obj: Any, where: str = "stage file") -> RunSpec:
        if not isinstance(obj, dict) or "stages" not in obj:
            raise MisfeatError(f"{where}: expected an object with a 'stages' list")
        stages = obj["stages"]
        if not isinstance(stages, list):
            raise MisfeatError(f"{where}: 'stages' must be a list")
        parsed = tuple(StageSpec.from_dict(s, f"{where}: stages[{i}]") for i, s in enumerate(stages))
        return _from_dict(cls, {**obj, "stages": parsed}, where)

    @classmethod
    def load(cls, path: str | Path) -> RunSpec:
        path = Path(path)
        if not path.is_file():
            raise MisfeatError(f"stage file {path} does not exist")
        try:
            obj = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise MisfeatError(f"stage file {path} is not valid JSON: {err}") from None
        return cls.from_dict(obj, str(path))

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["stages"] = [{f.name: _named(getattr(s, f.name)) for f in dataclasses.fields(s)} for s in self.stages]
        return out


def _named(value: Any) -> Any:
    """A stage field as JSON: a loaded prompt set by its name and hash, a match spec as a dict."""
    if isinstance(value, MatchSpec):
        return dataclasses.asdict(value)
    if hasattr(value, "records") and hasattr(value, "hash"):
        return {"name": value.name, "hash": value.hash, "n": len(value)}
    return value
