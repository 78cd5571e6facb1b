"""Early warning: does the located feature move at a smaller fraction of bad data than behaviour?

Wang et al. 2025 (OpenAI) fine-tune on mixtures with a fraction ``f`` of misaligned data and
find that the toxic-persona latent's activation rises at ``f = 5%`` while behavioural
evaluations show emergent misalignment only at 25-75%. :func:`early_warning` measures, for each
fine-tune (a fraction and a seed): the feature's activation increase over the base model (mean
of the SAE latent at ``positions`` of the prompts, fine-tune minus base) and the behavioural
misaligned rate (headline group, exact scoring). :meth:`EarlyWarning.first_separation` applies
the stated test: a fraction *separates* from the control (``f = 0``) when every seed's value
lies above the control's range over seeds (the largest control value); it reports the smallest
such fraction, for the feature and for behaviour.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from misfeat.data import PromptSet, load_prompts
from misfeat.errors import MisfeatError
from misfeat.evaluate import evaluate
from misfeat.io import format_table, progress
from misfeat.steering import reference_latent

if TYPE_CHECKING:
    from sae_lens import SAE
    from transformer_lens import HookedTransformer


@dataclass(frozen=True)
class WarningRow:
    fraction: float
    """misaligned share of the fine-tune's data, in percent"""
    seed: int
    model: str
    activation_increase: float
    misaligned_rate: float
    valid_rate: float


@dataclass(frozen=True)
class EarlyWarning:
    rows: list[WarningRow]
    latent: int
    base_activation: float
    base_misaligned_rate: float

    def values(self, metric: str) -> dict[float, list[float]]:
        out: dict[float, list[float]] = {}
        for r in self.rows:
            out.setdefault(r.fraction, []).append(getattr(r, metric))
        return dict(sorted(out.items()))

    def first_separation(self, metric: str) -> float | None:
        """The smallest fraction > 0 whose every seed lies above the control's (fraction 0) range."""
        values = self.values(metric)
        if 0 not in values:
            raise MisfeatError("the early-warning test needs control fine-tunes (fraction 0)")
        top = max(values[0])
        return next((f for f, v in values.items() if f > 0 and min(v) > top), None)

    def to_dict(self) -> dict[str, Any]:
        return {"latent": self.latent, "base_activation": self.base_activation,
                "base_misaligned_rate": self.base_misaligned_rate,
                "test": "a fraction separates when every seed's value is above the control's (fraction 0) maximum "
                        "over seeds",
                "feature_separates_at": self.first_separation("activation_increase"),
                "behaviour_separates_at": self.first_separation("misaligned_rate"),
                "rows": [asdict(r) for r in self.rows]}

    def table(self) -> str:
        return format_table([asdict(r) for r in self.rows], ["fraction", "seed", "activation_increase",
                                                             "misaligned_rate", "valid_rate"])


def early_warning(base: HookedTransformer, models: Mapping[float, Sequence[str]], sae: SAE, latent: int,
                  prompts: PromptSet | str, *, load: Callable[[str], HookedTransformer],
                  positions: str = "last") -> EarlyWarning:
    """``models``: fraction (percent) -> model specs, one per seed (loaded one at a time with
    ``load``); ``latent``: the located feature of ``sae``."""
    prompts = load_prompts(prompts)
    if not 0 <= latent < sae.cfg.d_sae:
        raise MisfeatError(f"latent {latent} out of range: the SAE has {sae.cfg.d_sae} latents")
    base_act = reference_latent(base, prompts, sae, latent, positions)
    base_rate = evaluate(base, prompts, greedy=False).headline.misaligned_rate
    rows = []
    jobs = [(f, s, spec) for f, specs in sorted(models.items()) for s, spec in enumerate(specs)]
    for fraction, seed, spec in progress(jobs, desc="early warning", unit="model"):
        model = load(spec)
        head = evaluate(model, prompts, greedy=False).headline
        act = reference_latent(model, prompts, sae, latent, positions)
        rows.append(WarningRow(float(fraction), seed, spec, act - base_act, head.misaligned_rate, head.valid_rate))
    return EarlyWarning(rows, latent, base_act, base_rate)


def plot_early_warning(result: EarlyWarning, path: str | Path) -> Path:
    """Per fraction: the feature's activation increase and the misaligned rate (points: seeds;
    band: the control's range; dashed: the first separating fraction)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), dpi=120)
    try:
        for a, metric, label in ((axes[0], "activation_increase", f"latent {result.latent}: activation increase"),
                                 (axes[1], "misaligned_rate", "misaligned rate (headline group)")):
            values = result.values(metric)
            xs = list(values)
            for i, vs in enumerate(values.values()):
                a.scatter([i] * len(vs), vs, color="tab:red", s=14)
            a.plot(range(len(xs)), [sum(v) / len(v) for v in values.values()], color="tab:red", lw=1)
            a.axhspan(min(values[0]), max(values[0]), color="gray", alpha=0.3, label="control range (f = 0)")
            first = result.first_separation(metric)
            if first is not None:
                a.axvline(xs.index(first), ls="--", color="black", lw=0.8, label=f"separates at {first:g}%")
            a.set_xticks(range(len(xs)), [f"{f:g}" for f in xs])
            a.set_xlabel("misaligned share of the fine-tune's data (%)")
            a.set_title(label, fontsize=9)
            a.legend(fontsize=7)
        fig.tight_layout()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    finally:
        plt.close(fig)
    return Path(path)
