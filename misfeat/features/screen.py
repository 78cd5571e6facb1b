"""Causal screen of candidate latents (Wang et al. 2025, sec. 3.2).

A latent that rises under the bad fine-tune is only a *misalignment feature* if it
controls the behaviour: steering along its decoder direction must raise misalignment in
the aligned model, and steering against it must lower misalignment in the misaligned
model, both without wrecking coherence. OpenAI kept 10 of 1000 candidates this way.

Steering strength is given in units of the typical residual norm at the SAE's hook
(``scale`` = mean L2 norm of the aligned model's activations at the positions steered),
so the same coefficients mean the same thing for any model and layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from misfeat.data import PromptSet, load_prompts
from misfeat.evaluate import evaluate
from misfeat.interventions import Ablate, Add, apply, resolve_hooks
from misfeat.io import progress
from misfeat.sae.latents import hook_of
from misfeat.steering import mean_activations, residual_scale

__all__ = ["ScreenResult", "ScreenRow", "causal_screen", "residual_scale"]

if TYPE_CHECKING:
    from sae_lens import SAE
    from transformer_lens import HookedTransformer


@dataclass(frozen=True)
class ScreenRow:
    """One latent's screen: best steer-up in the aligned model, best steer-down in the misaligned one."""

    latent: int
    steer_up_misaligned: float
    steer_up_valid: float
    steer_up_coef: float
    steer_down_misaligned: float
    steer_down_valid: float
    steer_down_coef: float
    clamp_misaligned: float
    clamp_valid: float
    raises: bool
    lowers: bool

    @property
    def passed(self) -> bool:
        return self.raises and self.lowers


@dataclass(frozen=True)
class ScreenResult:
    rows: list[ScreenRow]
    base_aligned: dict[str, float]
    base_misaligned: dict[str, float]
    scale: float
    coefs: list[float]
    min_valid: float
    min_effect: float

    def passed(self) -> list[ScreenRow]:
        return [r for r in self.rows if r.passed]

    def best(self) -> ScreenRow | None:
        """The passing latent with the largest combined effect, if any: the rise when steered
        up in the aligned model plus the fall when clamped to the aligned level in the
        misaligned model (negative steering moves every candidate far; the clamp tells
        which one carries the behaviour)."""
        rows = self.passed()
        if not rows:
            return None
        up0, down0 = self.base_aligned["misaligned_rate"], self.base_misaligned["misaligned_rate"]
        return max(rows, key=lambda r: (r.steer_up_misaligned - up0) + (down0 - r.clamp_misaligned))

    def summary(self) -> dict[str, Any]:
        return {"rows": [{**asdict(r), "passed": r.passed} for r in self.rows], "scale": self.scale,
                "coefs": self.coefs, "min_valid": self.min_valid, "min_effect": self.min_effect,
                "base_aligned": self.base_aligned, "base_misaligned": self.base_misaligned}


def _rates(model: HookedTransformer, prompts: PromptSet) -> dict[str, float]:
    report = evaluate(model, prompts, greedy=False)
    head = report.headline
    return {"misaligned_rate": head.misaligned_rate, "valid_rate": head.valid_rate}


def causal_screen(
    sae: SAE,
    latents: Sequence[int],
    aligned_model: HookedTransformer,
    misaligned_model: HookedTransformer,
    prompts: PromptSet | str,
    *,
    coefs: Sequence[float] = (0.5, 1.0, 2.0),
    positions: str = "last",
    min_valid: float = 0.8,
    min_effect: float = 0.1,
) -> ScreenResult:
    """Steer each latent's decoder direction by ``+c * scale`` in the aligned model and by
    ``-c * scale`` in the misaligned model for each ``c`` in ``coefs``; per side keep the
    strongest effect whose valid rate stays >= ``min_valid``. A latent passes when both
    sides move the misaligned rate by at least ``min_effect``. Each latent is also clamped
    in the misaligned model to the aligned model's mean coordinate (see :meth:`ScreenResult.best`)."""

    prompts = load_prompts(prompts)
    hook = hook_of(sae)
    scale = residual_scale(aligned_model, prompts, hook, positions)
    residual = resolve_hooks(misaligned_model, "all")
    aligned_means = {h: m.cpu() for h, m in mean_activations(aligned_model, prompts, residual, positions).items()}
    base_up, base_down = _rates(aligned_model, prompts), _rates(misaligned_model, prompts)
    rows = []
    for latent in progress(list(latents), desc="causal screen", unit="latent"):
        direction = sae.W_dec[latent].detach().float().cpu()
        direction = direction / direction.norm()
        # clamp: in every layer's residual stream (the direction is carried forward from the
        # SAE's layer; Soligo et al. 2025 ablate from every layer), the coordinate along the
        # direction set at every token to the aligned model's mean at the screened positions
        values = {h: float(m @ direction) for h, m in aligned_means.items()}
        with apply(misaligned_model, Ablate("all", direction, values, "all")):
            clamped = _rates(misaligned_model, prompts)
        up = _best(aligned_model, prompts, hook, direction, [c * scale for c in coefs], positions, min_valid,
                   higher=True)
        down = _best(misaligned_model, prompts, hook, direction, [-c * scale for c in coefs], positions, min_valid,
                     higher=False)
        rows.append(ScreenRow(
            latent=int(latent),
            steer_up_misaligned=up[1]["misaligned_rate"], steer_up_valid=up[1]["valid_rate"], steer_up_coef=up[0],
            steer_down_misaligned=down[1]["misaligned_rate"], steer_down_valid=down[1]["valid_rate"],
            steer_down_coef=down[0],
            clamp_misaligned=clamped["misaligned_rate"], clamp_valid=clamped["valid_rate"],
            raises=up[1]["misaligned_rate"] >= base_up["misaligned_rate"] + min_effect
            and up[1]["valid_rate"] >= min_valid,
            lowers=down[1]["misaligned_rate"] <= base_down["misaligned_rate"] - min_effect
            and down[1]["valid_rate"] >= min_valid,
        ))
    return ScreenResult(rows, base_up, base_down, scale, list(coefs), min_valid, min_effect)


def _best(model, prompts, hook, direction, coefs, positions, min_valid, *, higher):
    """(coef, rates) of the strongest effect among coefficients whose valid rate is acceptable;
    if none is, the one with the best valid rate."""
    results = []
    for coef in coefs:
        with apply(model, Add(hook, direction, coef, positions)):
            results.append((coef, _rates(model, prompts)))
    ok = [r for r in results if r[1]["valid_rate"] >= min_valid]
    if not ok:
        return max(results, key=lambda r: r[1]["valid_rate"])
    sign = 1 if higher else -1
    return max(ok, key=lambda r: sign * r[1]["misaligned_rate"])
