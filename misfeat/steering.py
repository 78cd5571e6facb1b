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

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from misfeat.data import PromptSet, load_prompts
from misfeat.errors import MisfeatError
from misfeat.evaluate import EvalReport, default_prompts, evaluate
from misfeat.interventions import Intervention, apply

if TYPE_CHECKING:
    import torch
    from transformer_lens import HookedTransformer

    from misfeat.judges import Judge


@dataclass(frozen=True)
class SweepRow:
    """One coefficient of a sweep (rates of the headline group: ``heldout`` or ``all``)."""

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
        from misfeat.io import format_table

        cols = ["coef", "misaligned_rate", "valid_rate", "logprob_gap", "greedy_misaligned_rate"]
        return format_table([{c: getattr(r, c) for c in cols} for r in self.rows], cols)


def headline_group(report: EvalReport) -> str:
    return "heldout" if "heldout" in report.groups else next(iter(report.groups))


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
    from misfeat.io import progress

    for coef in progress(list(coefs) if coefs is not None else [None], desc="steer sweep", unit="coef"):
        current = intervention if coef is None else intervention.with_coef(coef)
        with apply(model, current):
            report = evaluate(model, prompts, method=method, judge=judge, **eval_kwargs)
        group = group or headline_group(report)
        head = report.groups[group]
        rows.append(SweepRow(coef, head.misaligned_rate, head.valid_rate, head.logprob_gap,
                             head.greedy_misaligned_rate, {k: asdict(v) for k, v in report.groups.items()}))
        shown = [r for r in report.per_prompt if r.get("domain") is None or group != "heldout"
                 or r["domain"] != prompts.meta.get("em_domain")]
        for row in shown[:samples_per_coef]:
            texts = row.get("samples") or ([row["greedy"]] if "greedy" in row else [])
            for text in texts:
                samples.append({"coef": coef, "id": row["id"], "domain": row.get("domain"), "completion": text})
    return SweepResult(rows, samples, group or "all", intervention.describe())


def plot_sweep(result: SweepResult, path: str | Path, title: str | None = None) -> Path:
    """Misaligned rate and valid rate against the coefficient, saved as a PNG."""
    from misfeat.plots import figure

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
                     positions: str = "all", max_batch_tokens: int = 16384) -> dict[str, torch.Tensor]:
    """Mean activation (float32, ``[d]``) of each hook over the selected positions of ``prompts``."""
    import torch

    from misfeat.activations import iter_activations

    out = {}
    for hook in hooks:
        total, n = None, 0
        for chunk in iter_activations(model, load_prompts(prompts), hook, positions, batch_tokens=max_batch_tokens):
            s = chunk.float().sum(0)
            total = s if total is None else total + s
            n += chunk.shape[0]
        if not n:
            from misfeat.errors import MisfeatError

            raise MisfeatError(f"no {positions!r} positions in the prompt set: nothing to average")
        out[hook] = (total / n).to(torch.float32)
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


def reference_coordinates(reference: HookedTransformer, prompts: PromptSet | str, hooks: Sequence[str],
                          direction: torch.Tensor, positions: str = "all") -> dict[str, float]:
    """The reference model's mean coordinate along the unit ``direction`` at each hook."""
    unit = (direction / direction.norm()).float().cpu()
    means = mean_activations(reference, prompts, hooks, positions)
    return {hook: float(mean.cpu() @ unit) for hook, mean in means.items()}


def reference_latent(reference: HookedTransformer, prompts: PromptSet | str, sae: Any, latent: int,
                     positions: str = "all") -> float:
    """The reference model's mean activation of SAE ``latent`` at the SAE's hook."""
    import torch

    from misfeat.activations import iter_activations

    hook = sae.cfg.metadata.hook_name
    total, n = 0.0, 0
    with torch.no_grad():
        for chunk in iter_activations(reference, load_prompts(prompts), hook, positions):
            total += float(sae.encode(chunk.to(sae.W_dec.dtype))[:, latent].sum())
            n += chunk.shape[0]
    return total / max(n, 1)
