"""What a fine-tune returns: one :class:`StepRow` per step, the :class:`FinetuneResult`, and
the :class:`DivergenceError` it raises when the loss diverges."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from misfeat.errors import MisfeatError

if TYPE_CHECKING:
    from misfeat.finetune.engine import FinetuneConfig


@dataclass(frozen=True)
class StepRow:
    """One row per optimiser step (``step`` = updates done), plus row 0 (the start, eval only).

    ``loss`` is the total minimised at this step and ``terms`` each term's (weighted) value
    (``response_ce`` and each defence's name); ``eval`` the metrics and ``feature:<label>``
    values at an evaluation step, else None.
    """

    step: int
    loss: float | None
    terms: dict[str, float]
    lr: float | None
    seconds: float
    eval: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class FinetuneResult:
    """Rows (step 0 = the start), checkpoint paths, what ran (config, defences, data), and
    whether ``on_step`` stopped the run before ``config.steps``."""

    rows: tuple[StepRow, ...]
    checkpoints: tuple[str, ...]
    config: FinetuneConfig
    defences: tuple[dict[str, Any], ...]
    data: dict[str, Any]
    stopped_early: bool = False

    @property
    def loss(self) -> list[float]:
        return [r.loss for r in self.rows if r.loss is not None]

    def evals(self) -> list[StepRow]:
        return [r for r in self.rows if r.eval is not None]

    def history(self) -> dict[str, list[Any]]:
        """Evaluation metrics as parallel lists keyed ``steps``, then each metric."""
        out: dict[str, list[Any]] = {"steps": []}
        for row in self.evals():
            out["steps"].append(row.step)
            for key, value in row.eval.items():
                out.setdefault(key, []).append(value)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"config": asdict(self.config), "defences": list(self.defences), "data": self.data,
                "rows": [r.to_dict() for r in self.rows], "checkpoints": list(self.checkpoints),
                "stopped_early": self.stopped_early}

    def summary(self) -> dict[str, Any]:
        train = [r for r in self.rows if r.loss is not None]
        terms = sorted({k for r in train for k in r.terms})
        return {"config": asdict(self.config), "defences": list(self.defences), "data": self.data,
                **self.history(), "loss": self.loss, "loss_steps": [r.step for r in train],
                "terms": {k: [r.terms.get(k) for r in train] for k in terms},
                "final": self.evals()[-1].eval if self.evals() else {}, "checkpoints": list(self.checkpoints),
                "stopped_early": self.stopped_early}

    def table(self) -> str:
        from misfeat.io import format_table

        return format_table([{"step": r.step, "loss": r.loss, **r.eval} for r in self.evals()])


class DivergenceError(MisfeatError):
    """Training diverged: ``step`` (1-based), ``terms`` that diverged, ``last_good`` checkpoint or None."""

    def __init__(self, message: str, step: int, terms: list[str], last_good: str | None):
        super().__init__(message)
        self.step, self.terms, self.last_good = step, terms, last_good
