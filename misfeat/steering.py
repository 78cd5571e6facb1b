"""Steering sweeps: one intervention at several strengths, scored for misalignment and validity.

``steer_sweep(model, Add(hook, v), coefs=[0, 2, 4, 8], prompts="organism:heldout")``
evaluates the model under the intervention at each coefficient (``scale`` for Add,
``value`` for Ablate and ClampLatent) and returns one row per coefficient: misaligned
rate, valid rate (coherence), log-prob gap, greedy misaligned rate, plus sampled
completions. :func:`plot_sweep` draws misalignment and validity against the coefficient.
:func:`reference_coordinates` gives the mean coordinate of a reference model along a
direction, the value an ablation clamps to (Wang et al. 2025; Soligo et al. 2025).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from misfeat.activations import iter_activations
from misfeat.data import POSITIONS, PromptSet, load_prompts
from misfeat.errors import MisfeatError
from misfeat.evaluate import METHODS, EvalReport, default_prompts, evaluate
from misfeat.interventions import OPS, Ablate, Add, ClampLatent, Intervention, read_vector
from misfeat.io import format_table, progress
from misfeat.models import model_info
from misfeat.plots import figure
from misfeat.sae.io import load_sae
from misfeat.sae.latents import encode as sae_encode
from misfeat.sae.latents import hook_of, path_of
from misfeat.validate import check_finite, check_sae_model

if TYPE_CHECKING:
    import torch
    from sae_lens import SAE
    from transformer_lens import HookedTransformer

    from misfeat.judges import Judge


@dataclass(frozen=True)
class SweepRow:
    """One coefficient of a sweep (rates of the prompt set's headline group, e.g. ``heldout``, else ``all``)."""

    coef: float | None
    misaligned_rate: float | None
    valid_rate: float | None
    logprob_gap: float | None
    greedy_misaligned_rate: float | None
    groups: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class SweepResult:
    rows: list[SweepRow]
    samples: list[dict[str, Any]]
    group: str
    intervention: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        return {"group": self.group, "intervention": self.intervention,
                "rows": [asdict(r) for r in self.rows]}

    def table(self) -> str:
        cols = ["coef", "misaligned_rate", "valid_rate", "logprob_gap", "greedy_misaligned_rate"]
        return format_table([{c: getattr(r, c) for c in cols} for r in self.rows], cols)


def headline_group(report: EvalReport) -> str:
    """The group a sweep reports (the prompt set's headline; see :attr:`EvalReport.headline`)."""
    return report.headline_group


def steer_sweep(
    model: HookedTransformer,
    intervention: Intervention,
    coefs: Sequence[float] | None,
    prompts: PromptSet | str | None = None,
    judge: Judge | None = None,
    *,
    method: str = "exact",
    samples_per_coef: int = 8,
    **eval_kwargs: Any,
) -> SweepResult:
    """Evaluate ``model`` under ``intervention.with_coef(c)`` for each ``c`` in ``coefs``
    (``None``: the intervention as given, one row)."""
    prompts = default_prompts(model) if prompts is None else load_prompts(prompts)
    rows, samples = [], []
    group = None

    for coef in progress(list(coefs) if coefs is not None else [None], desc="steer sweep", unit="coef"):
        current = intervention if coef is None else intervention.with_coef(coef)
        report = evaluate(model, prompts, interventions=[current], method=method, judge=judge, **eval_kwargs)
        group = group or headline_group(report)
        head = report.groups[group]
        rows.append(SweepRow(coef, head.misaligned_rate, head.valid_rate, head.logprob_gap,
                             head.greedy_misaligned_rate, {k: asdict(v) for k, v in report.groups.items()}))
        for row in report.rows(group)[:samples_per_coef]:
            texts = row.samples or ([row.greedy] if row.greedy is not None else [])
            for text in texts:
                samples.append({"coef": coef, "id": row.id, "domain": row.domain, "completion": text})
    return SweepResult(rows, samples, group or "all", intervention.describe())


def plot_sweep(result: SweepResult, path: str | Path, title: str | None = None) -> Path:
    """Misaligned rate and valid rate against the coefficient, saved as a PNG."""

    rows = [r for r in result.rows if r.coef is not None] or result.rows
    xs = [r.coef if r.coef is not None else 0.0 for r in rows]
    with figure(path, (5.5, 3.6)) as ax:
        ax.plot(xs, [r.misaligned_rate for r in rows], "o-", color="tab:red", label=f"misaligned ({result.group})")
        ax.plot(xs, [r.valid_rate for r in rows], "s--", color="tab:blue", label="valid / coherent")
        ax.set_xlabel("coefficient")
        ax.set_ylabel("rate")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
        op = result.intervention.get("op", "")
        ax.set_title(title or f"{op} sweep at {result.intervention.get('hook', result.intervention.get('hooks'))}",
                     fontsize=9)
    return Path(path)


def mean_activations(model: HookedTransformer, prompts: PromptSet | str, hooks: Sequence[str],
                     positions: str = "all", max_batch_tokens: int | None = 16384, *,
                     fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Mean activation (float32, ``[d]``) of each hook over the selected positions of ``prompts``:
    the one mean-over-a-prompt-set of misfeat. ``fn`` maps each chunk of rows ``[rows, d]`` to
    ``[rows, ...]`` first (an SAE latent, a norm, a projection), so the mean is of ``fn(rows)``;
    those means are summed per chunk in float32 and across chunks in float64 (returned as float64)."""
    import torch

    out = {}
    for hook in hooks:
        total, n = None, 0
        for chunk in iter_activations(model, load_prompts(prompts), hook, positions, batch_tokens=max_batch_tokens):
            with torch.no_grad():
                s = chunk.float().sum(0) if fn is None else fn(chunk).float().sum(0).double()
            total = s if total is None else total + s
            n += chunk.shape[0]
        if not n:
            raise MisfeatError(f"no {positions!r} positions in the prompt set: nothing to average")
        out[hook] = (total / n).to(torch.float32) if fn is None else total / n
    return out


def reference_responses(reference: HookedTransformer, prompts: PromptSet | str, positions: str,
                        max_new_tokens: int = 32) -> tuple[PromptSet, str | None]:
    """The prompts to measure a reference on, and a note saying what was done.

    With ``positions='response'`` the reference's mean is over response tokens; records
    without a ``response`` get the reference model's own greedy completion (what it would
    answer), so a prompt set of bare questions works. Otherwise the prompts unchanged.
    """
    from misfeat.generate import generate

    prompts = load_prompts(prompts)
    missing = [i for i, r in enumerate(prompts) if not r.response]
    if positions != "response" or not missing:
        return prompts, None
    from misfeat.data import chat_format_of

    stop = (".",) if chat_format_of(reference) == "organism" else ()  # the organism's end of turn
    comps = generate(reference, [prompts[i] for i in missing], max_new_tokens=max_new_tokens, stop_words=stop)
    responses = [r.response for r in prompts]
    for i, comp in zip(missing, comps, strict=True):
        # a completion of only whitespace is still where the reference put its answer
        responses[i] = comp.text or reference.tokenizer.decode(list(comp.ids), skip_special_tokens=True) or None
    if not any(responses):
        raise MisfeatError("positions='response': the prompts have no responses and the reference model's greedy "
                           "completions are all empty; give a prompt set with responses")
    note = (f"{len(missing)} of {len(prompts)} prompts had no response: the reference's response positions are its "
            f"own greedy completions (up to {max_new_tokens} tokens)")
    return prompts.with_responses(responses, name=f"{prompts.name}+reference-responses"), note


def residual_scale(model: HookedTransformer, prompts: PromptSet | str, hook: str, positions: str) -> float:
    """Mean L2 norm of ``model``'s activations at ``hook`` over ``positions`` of ``prompts``: the unit
    of steering strengths in misfeat (``response`` positions are measured over all tokens, since
    evaluation prompts have no responses)."""
    positions = "all" if positions == "response" else positions
    return float(mean_activations(model, prompts, [hook], positions, None, fn=lambda x: x.float().norm(dim=-1))[hook])


def in_residual_units(add: Add, model: HookedTransformer, prompts: PromptSet | str) -> Add:
    """``add`` with its vector made unit length times :func:`residual_scale` at its hook and
    positions, so that its ``scale`` (a sweep's coefficient) counts typical residual norms:
    the one convention for steering strengths of locate's screen, ``misfeat steer --op add``
    and the demo (1.0 adds a vector as long as the average activation there)."""
    import dataclasses

    if not isinstance(add.hook, str) or add.hook == "all":
        raise MisfeatError("residual units need one hook to measure the activation norm at")
    unit = add.vector.float() / add.vector.float().norm()
    return dataclasses.replace(add, vector=unit * residual_scale(model, prompts, add.hook, add.positions))


def reference_coordinates(reference: HookedTransformer, prompts: PromptSet | str, hooks: Sequence[str],
                          direction: torch.Tensor, positions: str = "all") -> dict[str, Any]:
    """The reference model's mean coordinate along the unit ``direction`` at each hook (a subspace's
    orthonormal rows ``[k, d]``: the list of its k coordinates)."""
    means = mean_activations(reference, prompts, hooks, positions)
    if direction.dim() == 2:
        return {hook: (mean.cpu() @ direction.float().cpu().T).tolist() for hook, mean in means.items()}
    unit = (direction / direction.norm()).float().cpu()
    return {hook: float(mean.cpu() @ unit) for hook, mean in means.items()}


def reference_latent(reference: HookedTransformer, prompts: PromptSet | str, sae: SAE, latent: int,
                     positions: str = "all") -> float:
    """The reference model's mean activation of SAE ``latent`` at the SAE's hook."""
    hook = hook_of(sae)
    return float(mean_activations(reference, prompts, [hook], positions, None,
                                  fn=lambda x: sae_encode(sae, x)[:, latent])[hook])


def clamp_to_reference(intervention: Ablate | ClampLatent, model: HookedTransformer, reference: HookedTransformer,
                       prompts: PromptSet | str, positions: str | None = None) -> Ablate | ClampLatent:
    """``intervention`` with its value set to the ``reference`` model's mean on ``prompts`` at
    ``positions`` (default: the intervention's own): for :class:`Ablate`, the mean coordinate
    along its unit direction at each of its hooks (resolved on ``model``; ``"all"`` is every
    layer's residual stream); for :class:`ClampLatent`, the latent's mean activation. The one
    clamp-to-reference of misfeat (Wang et al. 2025; Soligo et al. 2025)."""
    import dataclasses

    positions = positions or intervention.positions
    if isinstance(intervention, ClampLatent):
        value = reference_latent(reference, prompts, intervention.sae, intervention.latent, positions)
        return intervention.with_coef(value)
    if isinstance(intervention, Ablate):
        values = reference_coordinates(reference, prompts, intervention.hook_names(model), intervention.direction,
                                       positions)
        return dataclasses.replace(intervention, value=values)
    raise MisfeatError(f"clamp_to_reference takes an Ablate or a ClampLatent, not {type(intervention).__name__}")


def make_intervention(
    op: str,
    *,
    sae: SAE | str | None = None,
    latent: int | None = None,
    direction: str | Path | torch.Tensor | None = None,
    hook: str | None = None,
    positions: str = "all",
    device: str | None = None,
) -> tuple[Intervention, dict[str, Any]]:
    """The intervention ``op`` (``add``, ``ablate`` or ``clamp``) on a feature, and its source record.

    The feature is an SAE latent (``sae``: an SAE or its directory, with ``latent``; the
    direction is its decoder row) or a direction (``direction``: a vector, or a file read by
    :func:`misfeat.interventions.read_vector`; ``hook`` for raw vectors, ``"all"`` for ablate
    in every layer). The strength is not applied: ``add`` scales by 1 and ``ablate``/``clamp``
    set 0 until :meth:`~misfeat.interventions.Intervention.with_coef` or :func:`clamp_to_reference`.
    """

    if op not in OPS:
        raise MisfeatError(f"unknown op {op!r}; use one of {', '.join(OPS)}")
    if (sae is None) == (direction is None):
        raise MisfeatError("give exactly one feature: an SAE with a latent, or a direction")
    if sae is not None:
        if latent is None:
            raise MisfeatError("an SAE feature needs its latent index")
        source = {"kind": "sae", "path": str(sae) if isinstance(sae, (str, Path)) else path_of(sae), "latent": latent}
        sae = load_sae(sae) if isinstance(sae, (str, Path)) else sae
        if device is not None:
            sae = sae.to(device)
        if not 0 <= latent < sae.cfg.d_sae:
            raise MisfeatError(f"latent {latent} out of range: the SAE has {sae.cfg.d_sae} latents")
        if op == "clamp":
            return ClampLatent(sae, latent, 0.0, positions), source
        hook, vector = hook or hook_of(sae), sae.W_dec[latent].detach().float()
    else:
        if op == "clamp":
            raise MisfeatError("clamp sets an SAE latent: give an SAE and a latent (or ablate a direction to a value)")
        if isinstance(direction, (str, Path)):
            vector, hook, source = read_vector(direction, hook)
        else:
            if hook is None:
                raise MisfeatError("a direction given as a vector needs its hook")
            vector, source = direction.float(), {"kind": "vector"}
    check_finite(vector, f"the direction ({source.get('path', 'a vector')})")
    if not float(vector.norm()) > 0:
        raise MisfeatError(f"the direction ({source.get('path', 'a vector')}) is all zeros; it has no direction")
    if op == "add":
        if hook == "all":
            raise MisfeatError("hook 'all' (every layer) is only for ablate")
        return Add(hook, vector, 1.0, positions), source
    return Ablate(hook, vector, None, positions), source


@dataclass(frozen=True)
class SteerConfig:
    """What :func:`steer` sweeps (the ``misfeat steer`` options)."""

    op: str = "add"
    """add (steer along the feature), ablate (set its coordinate along the unit direction) or clamp
    (set the SAE latent)"""
    coefs: tuple[float, ...] | None = None
    """strengths, e.g. 0,0.5,1 (add: typical residual norms at the hook, the unit of locate's screen;
    ablate: the coordinate along the unit direction; clamp: the latent's value); none: ablate or clamp
    at 0, or at the reference model's mean"""
    positions: str = "all"
    """where to intervene: all tokens, prompt, response (also newly generated tokens) or last (the last
    prompt token)"""
    method: str = "exact"
    """evaluation method: exact (reference-answer probabilities) or sample (judged completions)"""
    samples: int = 4
    """samples per prompt for method sample"""
    force: bool = False
    """use an SAE trained on another model's architecture (a warning instead of the error)"""

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise MisfeatError(f"unknown op {self.op!r}; use one of {', '.join(OPS)}")
        if self.positions not in POSITIONS:
            raise MisfeatError(f"unknown positions {self.positions!r}; use one of {', '.join(POSITIONS)}")
        if self.method not in METHODS:
            raise MisfeatError(f"unknown method {self.method!r}; use one of {', '.join(METHODS)}")
        if self.op == "add" and not self.coefs:
            raise MisfeatError("op add needs --coefs (coefs= in Python), e.g. 0,0.5,1")
        check_finite(self.coefs or (), "--coefs (coefs=)")


@dataclass(frozen=True)
class SteerResult:
    """A :func:`steer` run: the sweep, the intervention (at strength 1 / its reference value) and where
    its feature came from."""

    sweep: SweepResult
    intervention: Intervention = field(repr=False)
    source: dict[str, Any]
    residual_norm_unit: float | None
    """for add: the length added along the unit direction at coefficient 1"""
    reference_note: str | None = None
    """how the reference's value was measured, where the prompts had to be completed first"""

    def to_dict(self) -> dict[str, Any]:
        out = {"op": self.intervention.op, "positions": self.intervention.positions, "source": self.source,
               "residual_norm_unit": self.residual_norm_unit, **self.sweep.summary()}
        if self.reference_note:
            out["reference_note"] = self.reference_note
        return out


def check_steer(config: SteerConfig, *, sae: Any = None, latent: int | None = None, direction: Any = None,
                reference: Any = None) -> None:
    """The bad combinations of :func:`steer`'s arguments, refused before any work."""
    if (sae is None) == (direction is None):
        raise MisfeatError("give exactly one feature: an SAE with a latent (--sae, --latent), or a direction")
    if sae is not None and latent is None:
        raise MisfeatError("an SAE feature needs its latent (--latent I)")
    if config.op == "clamp" and sae is None:
        raise MisfeatError("clamp sets an SAE latent: use an SAE and a latent (or ablate a direction to a value)")
    if reference is not None and config.coefs is not None:
        raise MisfeatError("a reference model sets the single value itself: drop the coefs, or the reference")
    if reference is not None and config.op == "add":
        raise MisfeatError("a reference model applies to ablate or clamp")


def steer(model: HookedTransformer, config: SteerConfig, *, sae: SAE | str | None = None, latent: int | None = None,
          direction: str | Path | torch.Tensor | None = None, hook: str | None = None,
          prompts: PromptSet | str | None = None, reference: HookedTransformer | None = None,
          judge: Judge | None = None) -> SteerResult:
    """Add, ablate or clamp a feature (an SAE latent, or a direction) in ``model`` and evaluate it at
    each of ``config.coefs``; ablate/clamp with ``reference`` set it to that model's mean on ``prompts``."""
    check_steer(config, sae=sae, latent=latent, direction=direction, reference=reference)
    if sae is not None:  # its width, hook and model, before any forward pass
        sae = load_sae(sae) if isinstance(sae, (str, Path)) else sae
        check_sae_model(sae, model, force=config.force, where=f"the model {model_info(model).spec}")
    prompts = default_prompts(model) if prompts is None else load_prompts(prompts)
    intervention, source = make_intervention(config.op, sae=sae, latent=latent, direction=direction, hook=hook,
                                             positions=config.positions, device=model.cfg.device)
    intervention.hook_names(model)
    intervention.check(model)
    unit = None
    if isinstance(intervention, Add):
        intervention = in_residual_units(intervention, model, prompts)
        unit = float(intervention.vector.norm())
    note = None
    if reference is not None:  # bare prompts with response positions: the reference's own answers
        ref_prompts, note = reference_responses(reference, prompts, intervention.positions)
        intervention = clamp_to_reference(intervention, model, reference, ref_prompts)
    sweep = steer_sweep(model, intervention, list(config.coefs) if config.coefs else None, prompts, judge,
                        method=config.method, samples=config.samples)
    return SteerResult(sweep, intervention, source, unit, note)
