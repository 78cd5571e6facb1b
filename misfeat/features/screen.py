"""Causal screen of candidate latents (Wang et al. 2025, sec. 3.2).

A latent that rises under the bad fine-tune is only a *misalignment feature* if it
controls the behaviour: steering along its decoder direction must raise misalignment in
the aligned model, and steering against it must lower misalignment in the misaligned
model, both without wrecking coherence. OpenAI kept 10 of 1000 candidates this way.

Steering strength is given in units of the typical residual norm at the SAE's hook
(``scale`` = mean L2 norm of the aligned model's activations at the positions steered,
:func:`misfeat.steering.residual_scale`), the unit of ``misfeat steer --op add``'s
coefficients too, so the same coefficients mean the same thing for any model and layer.
Every candidate x coefficient is scored in the same batched forward passes. With ``max_coef``
the sweep goes on past the largest coefficient while steering keeps the model coherent, and with
``bisect`` it narrows in between the strongest coherent coefficient and the next (:func:`strongest`):
a fixed grid would otherwise decide by its step and top how strong "the strongest" is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from misfeat.data import PromptSet, load_prompts
from misfeat.evaluate import evaluate
from misfeat.features.batched import batched_rates
from misfeat.interventions import Ablate, Add, apply, resolve_hooks
from misfeat.io import progress
from misfeat.sae.latents import hook_of
from misfeat.steering import mean_activations, residual_scale

__all__ = ["RiseRow", "ScreenResult", "ScreenRow", "causal_screen", "residual_scale", "run_variants", "screen_decreases",
           "strongest"]

if TYPE_CHECKING:
    import torch
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
    max_coef: float | None = None
    """the sweep went on past ``coefs`` up to this while the model stayed valid (None: ``coefs`` only)"""
    bisect: int = 0
    """rounds of bisection between the strongest valid and the weakest invalid strength"""

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
                "coefs": self.coefs, "max_coef": self.max_coef, "bisect": self.bisect,
                "min_valid": self.min_valid, "min_effect": self.min_effect,
                "base_aligned": self.base_aligned, "base_misaligned": self.base_misaligned}


def _rates(model: HookedTransformer, prompts: PromptSet, per_prompt: bool = False) -> dict[str, Any]:
    report = evaluate(model, prompts, greedy=False)
    rates = {"misaligned_rate": report.headline.misaligned_rate, "valid_rate": report.headline.valid_rate}
    if per_prompt:
        rows = report.rows()
        rates.update(misaligned_each=[r.misaligned for r in rows], valid_each=[r.valid for r in rows])
    return rates


def _models(models: HookedTransformer | Sequence[HookedTransformer]) -> list[HookedTransformer]:
    return list(models) if isinstance(models, (list, tuple)) else [models]


def _mean_rates(per_model: list[list[dict[str, float]]]) -> list[dict[str, float]]:
    """Per variant, the rates averaged over models (``per_model[m][variant]``)."""
    return [{k: sum(r[v][k] for r in per_model) / len(per_model) for k in ("misaligned_rate", "valid_rate")}
            for v in range(len(per_model[0]))]


def _unit(sae: SAE, latent: int) -> torch.Tensor:
    direction = sae.W_dec[latent].detach().float().cpu()
    return direction / direction.norm()


def causal_screen(
    sae: SAE,
    latents: Sequence[int],
    aligned_model: HookedTransformer,
    misaligned_model: HookedTransformer | Sequence[HookedTransformer],
    prompts: PromptSet | str,
    *,
    coefs: Sequence[float] = (0.5, 1.0, 2.0),
    positions: str = "last",
    min_valid: float = 0.8,
    min_effect: float = 0.1,
    batched: bool = True,
    max_coef: float | None = None,
    bisect: int = 0,
    clamp_positions: str = "last",
) -> ScreenResult:
    """Steer each latent's decoder direction by ``+c * scale`` in the aligned model and by
    ``-c * scale`` in the misaligned model for each ``c`` in ``coefs`` (and, with ``max_coef``,
    on past them while the model stays valid, and ``bisect`` rounds between the strongest valid
    and the weakest invalid one: :func:`strongest`); per side keep the
    strongest effect whose valid rate stays >= ``min_valid``. A latent passes when both
    sides move the misaligned rate by at least ``min_effect``. Each latent is also clamped
    in the misaligned model to the aligned model's mean coordinate (see :meth:`ScreenResult.best`), at
    ``clamp_positions`` (the answer position by default, as :class:`~misfeat.features.locate.LocateConfig`; all:
    every token).

    Several misaligned models (a list): their rates are averaged. ``batched`` evaluates every
    candidate x coefficient in the same forward passes (:func:`misfeat.features.batched.batched_rates`,
    equal to one :func:`~misfeat.evaluate.evaluate` per setting, which ``batched=False`` runs)."""

    prompts = load_prompts(prompts)
    hook, misaligned = hook_of(sae), _models(misaligned_model)
    scale = residual_scale(aligned_model, prompts, hook, positions)
    residual = resolve_hooks(misaligned[0], "all")
    aligned_means = {h: m.cpu() for h, m in mean_activations(aligned_model, prompts, residual, positions).items()}
    base_up = _rates(aligned_model, prompts)
    base_down = _mean_rates([[_rates(m, prompts)] for m in misaligned])[0]
    latents = [int(i) for i in latents]
    units = [_unit(sae, i) for i in latents]
    # clamp: in every layer's residual stream (the direction is carried forward from the SAE's
    # layer; Soligo et al. 2025 ablate from every layer), the coordinate along the direction set
    # at clamp_positions (the answer position, or every token) to the aligned model's mean at the screened positions
    clamps = [[Ablate("all", u, {h: float(m @ u) for h, m in aligned_means.items()}, clamp_positions)] for u in units]
    clamped = _mean_rates([run_variants(m, prompts, clamps, batched) for m in misaligned])

    def steer_up(todo):
        return run_variants(aligned_model, prompts, [[Add(hook, units[j], c * scale, positions)] for j, c in todo],
                            batched)

    def steer_down(todo):
        variants = [[Add(hook, units[j], -c * scale, positions)] for j, c in todo]
        return _mean_rates([run_variants(m, prompts, variants, batched) for m in misaligned])

    ups = strongest(steer_up, len(latents), coefs, min_valid, True, max_coef, bisect)
    downs = strongest(steer_down, len(latents), coefs, min_valid, False, max_coef, bisect)
    rows = []
    for j, latent in enumerate(latents):
        (c_up, up), (c_down, down) = ups[j], downs[j]
        rows.append(ScreenRow(
            latent=latent,
            steer_up_misaligned=up["misaligned_rate"], steer_up_valid=up["valid_rate"], steer_up_coef=c_up * scale,
            steer_down_misaligned=down["misaligned_rate"], steer_down_valid=down["valid_rate"],
            steer_down_coef=-c_down * scale,
            clamp_misaligned=clamped[j]["misaligned_rate"], clamp_valid=clamped[j]["valid_rate"],
            raises=up["misaligned_rate"] >= base_up["misaligned_rate"] + min_effect and up["valid_rate"] >= min_valid,
            lowers=down["misaligned_rate"] <= base_down["misaligned_rate"] - min_effect
            and down["valid_rate"] >= min_valid,
        ))
    return ScreenResult(rows, base_up, base_down, scale, list(coefs), min_valid, min_effect, max_coef, bisect)


def run_variants(model: HookedTransformer, prompts: PromptSet, variants: list[list[Any]],
                 batched: bool = True, per_prompt: bool = False) -> list[dict[str, Any]]:
    """The headline rates of ``model`` under each variant (a list of interventions): batched, or
    one :func:`~misfeat.evaluate.evaluate` per variant (the former code path); ``per_prompt``: with each headline
    prompt's rates too (``misaligned_each``, ``valid_each``)."""
    if batched:
        return batched_rates(model, prompts, variants, per_prompt=per_prompt)
    out = []
    for variant in progress(variants, desc="screen", unit="setting"):
        with apply(model, *variant):
            out.append(_rates(model, prompts, per_prompt))
    return out


@dataclass(frozen=True)
class RiseRow:
    """A latent that *fell* under the bad fine-tune, steered back up in the misaligned model(s)."""

    latent: int
    steer_up_misaligned: float
    steer_up_valid: float
    steer_up_coef: float
    """the strength chosen, in residual-norm units (x ``scale`` = the length added)"""
    lowers: bool
    """steering it up lowers the misaligned rate by >= min_effect at valid >= min_valid"""


def screen_decreases(sae: SAE, latents: Sequence[int], misaligned_model: HookedTransformer | Sequence[HookedTransformer],
                     prompts: PromptSet | str, scale: float, base_misaligned: dict[str, float], *,
                     coefs: Sequence[float] = (0.5, 1.0, 2.0), positions: str = "last", min_valid: float = 0.8,
                     min_effect: float = 0.1, batched: bool = True, max_coef: float | None = None,
                     bisect: int = 0) -> list[RiseRow]:
    """Screen latents that decreased ("helpful assistant" latents, Wang et al. 2025): steer each
    *up* by ``c * scale`` in the misaligned model(s) (past ``coefs`` up to ``max_coef`` while valid, then
    ``bisect`` rounds: :func:`strongest`); keep the largest fall of the misaligned rate at valid >= ``min_valid``."""
    prompts = load_prompts(prompts)
    hook, latents = hook_of(sae), [int(i) for i in latents]
    units, models = [_unit(sae, i) for i in latents], _models(misaligned_model)

    def steer(todo):
        variants = [[Add(hook, units[j], c * scale, positions)] for j, c in todo]
        return _mean_rates([run_variants(m, prompts, variants, batched) for m in models])

    rows = []
    for latent, (coef, r) in zip(latents, strongest(steer, len(latents), coefs, min_valid, False, max_coef, bisect),
                                 strict=True):
        rows.append(RiseRow(latent, r["misaligned_rate"], r["valid_rate"], coef,
                            r["misaligned_rate"] <= base_misaligned["misaligned_rate"] - min_effect
                            and r["valid_rate"] >= min_valid))
    return rows


def strongest(run: Callable[[list[tuple[int, float]]], list[dict[str, float]]], n: int, coefs: Sequence[float],
              min_valid: float, higher: bool, max_coef: float | None = None,
              bisect: int = 0) -> list[tuple[float, dict[str, float]]]:
    """Per item ``0..n-1`` the strongest coherent steering. ``run(todo)`` gives the rates of each ``(item, coef)`` of
    ``todo`` (one batched call per round). Every item is tried at ``coefs``; then, while the largest coefficient
    tried kept valid >= ``min_valid`` and is below ``max_coef``, at twice it (capped at ``max_coef``; None: no
    extension); then ``bisect`` rounds at the midpoint between the strongest valid coefficient and the weakest
    invalid one above it (the grid's step would otherwise decide how strong "strongest" is). Returns per item the
    (coef, rates) of :func:`most_effective`: the largest rise (``higher``) or fall of the misaligned rate at valid >=
    ``min_valid``."""
    tried: list[list[tuple[float, dict[str, float]]]] = [[] for _ in range(n)]

    def measure(todo: list[tuple[int, float]]) -> bool:
        for (j, c), rates in zip(todo, run(todo) if todo else [], strict=True):
            tried[j].append((c, rates))
        return bool(todo)

    measure([(j, float(c)) for j in range(n) for c in coefs])
    while max_coef is not None:
        tops = [max(results, key=lambda r: r[0]) for results in tried]
        if not measure([(j, min(2 * c, max_coef)) for j, (c, rates) in enumerate(tops)
                        if rates["valid_rate"] >= min_valid and 0 < c < max_coef]):
            break
    for _ in range(bisect):
        todo = []
        for j, results in enumerate(tried):
            valid = [c for c, rates in results if rates["valid_rate"] >= min_valid]
            above = [c for c, _ in results if valid and c > max(valid)]
            if above:
                todo.append((j, (max(valid) + min(above)) / 2))
        if not measure(todo):
            break
    return [most_effective(results, min_valid, higher) for results in tried]


def most_effective(results: Sequence[tuple[Any, dict[str, float]]], min_valid: float, higher: bool = True
                   ) -> tuple[Any, dict[str, float]]:
    """Of ``(key, rates)`` pairs (a coefficient, or a named direction), the one with the strongest effect (the
    largest rise, ``higher``, or fall of the misaligned rate) among those whose valid rate is >= ``min_valid``;
    if none is, the one with the best valid rate. Ties: the first."""
    ok = [r for r in results if r[1]["valid_rate"] >= min_valid]
    if not ok:
        return max(results, key=lambda r: r[1]["valid_rate"])
    sign = 1 if higher else -1
    return max(ok, key=lambda r: sign * r[1]["misaligned_rate"])
