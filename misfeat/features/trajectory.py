"""Trajectories: a feature and the behaviour across checkpoints of a fine-tune.

For checkpoints in training order (e.g. the organism's ``em-steps/step-NNNN``), measure
each probe (an SAE latent's activation, a direction's projection) and the misaligned
rate, in one table and one plot, and answer the question the OpenAI detector result
raises: does the feature move before the behaviour does? Each series' *onset* is the
first checkpoint where it has covered half of its total change.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from misfeat import registry
from misfeat.checkpoints import checkpoint_step, list_checkpoints
from misfeat.data import PromptSet, load_prompts
from misfeat.evaluate import default_prompts, evaluate
from misfeat.io import format_table, progress
from misfeat.models import load_model
from misfeat.plots import figure

__all__ = ["Trajectory", "checkpoint_step", "list_checkpoints", "plot_trajectory", "trajectory"]

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


@dataclass(frozen=True)
class Trajectory:
    """Rows per checkpoint: ``checkpoint``, ``step``, the behaviour and every probe."""

    rows: list[dict[str, Any]]
    probes: list[str]

    def series(self, key: str) -> list[float]:
        return [r[key] for r in self.rows]

    def onset(self, key: str, fraction: float = 0.5) -> int | None:
        """Step where ``key`` first covers ``fraction`` of its change from the first checkpoint
        to its extreme (None if it never moves)."""
        values = self.series(key)
        start = values[0]
        extreme = max(values, key=lambda v: abs(v - start))
        if abs(extreme - start) < 1e-9:
            return None
        for row, v in zip(self.rows, values, strict=True):
            if abs(v - start) >= fraction * abs(extreme - start):
                return row["step"]
        return None

    def summary(self) -> dict[str, Any]:
        onsets = {key: self.onset(key) for key in ["misaligned_rate", *self.probes]}
        behaviour = onsets["misaligned_rate"]
        leads = {p: (behaviour - onsets[p]) if behaviour is not None and onsets[p] is not None else None
                 for p in self.probes}
        return {"rows": self.rows, "probes": self.probes, "onset_step": onsets, "feature_leads_by_steps": leads}

    def table(self) -> str:
        return format_table(self.rows)



def trajectory(
    checkpoints: Sequence[str | Path] | str | Path,
    probes: Sequence[Any],
    prompts: PromptSet | str | None = None,
    *,
    device: str | None = None,
) -> Trajectory:
    """Measure ``probes`` and the misaligned rate on every checkpoint (a list, or a directory of them)."""

    if isinstance(checkpoints, (str, Path)):  # a plug-in's model spec, else a directory of checkpoints
        checkpoints = [checkpoints] if registry.for_spec(str(checkpoints)) else list_checkpoints(checkpoints)
    rows, names = [], []
    for i, spec in enumerate(progress(list(checkpoints), desc="checkpoints", unit="ckpt")):
        model: HookedTransformer = load_model(spec, device=device)
        for probe in probes:
            if hasattr(probe, "sae"):
                probe.sae.to(model.cfg.device)
        evalset = default_prompts(model) if prompts is None else load_prompts(prompts)
        report = evaluate(model, evalset, greedy=False)
        head = report.headline
        row: dict[str, Any] = {"checkpoint": Path(str(spec)).name, "step": checkpoint_step(spec, i),
                               "misaligned_rate": head.misaligned_rate, "valid_rate": head.valid_rate,
                               "logprob_gap": head.logprob_gap}
        for probe in probes:
            row.update(probe.measure(model, evalset))
        rows.append(row)
        names = [k for k in row if k not in ("checkpoint", "step", "misaligned_rate", "valid_rate", "logprob_gap")
                 and not k.endswith("/firing")]
    return Trajectory(rows, names)


def plot_trajectory(result: Trajectory, path: str | Path, title: str = "feature vs behaviour") -> Path:
    """Behaviour and each probe against the step, each scaled to [0, 1] over its own range."""

    steps = result.series("step")
    with figure(path, (6, 3.6)) as ax:
        colors = ["tab:red", "tab:green", "tab:purple", "tab:brown", "tab:blue"]
        for key, color in zip(["misaligned_rate", *result.probes], colors, strict=False):
            values = result.series(key)
            lo, hi = min(values), max(values)
            scaled = [(v - lo) / (hi - lo) if hi > lo else 0.0 for v in values]
            style = "o-" if key == "misaligned_rate" else "d--"
            ax.plot(steps, scaled, style, color=color, label=f"{key} [{lo:.2g}, {hi:.2g}]")
            onset = result.onset(key)
            if onset is not None:
                ax.axvline(onset, color=color, alpha=0.25)
        ax.set_xlabel("checkpoint step")
        ax.set_ylabel("scaled to its own range")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        ax.set_title(title, fontsize=9)
    return Path(path)
