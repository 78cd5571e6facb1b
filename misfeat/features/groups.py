"""Latent groups, latent families and the baselines of a locate run.

A feature split across several SAE latents (the normal case for large SAEs) is one
subspace: :func:`select_group` grows a group greedily (forward selection over the screened
candidates, in the order of their two-sided effect), each step adding the latent whose
joint clamp cuts misalignment most. The joint clamp sets the misaligned model's component
in the span of the group's decoder rows, in every layer's residual stream at every token (or
only at the answer position: ``positions``), to the aligned model's mean there (an
:class:`~misfeat.interventions.Ablate` on orthonormal rows). It stops at ``cap`` latents or when a step gains less than ``tol``.

:func:`families` shows which latents belong together: their decoder cosines and the
correlation of their activations (co-activation) on the misaligned model's rows.

:func:`baselines` runs the same protocol (steer up in the aligned model in residual-norm
units; clamp to the aligned level in every layer of the misaligned model) on the
mean-difference direction (misaligned minus aligned activations at the same positions)
and on a random direction of the same norm, so the SAE result is seen beside both.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from misfeat import stats
from misfeat.data import PromptSet
from misfeat.errors import MisfeatError
from misfeat.features.directions import Direction, random_like
from misfeat.features.screen import run_variants, strongest
from misfeat.interventions import Ablate, Add, orthonormal_rows

if TYPE_CHECKING:
    import torch
    from sae_lens import SAE
    from transformer_lens import HookedTransformer


def subspace_clamp(vectors: torch.Tensor, reference_means: dict[str, torch.Tensor], positions: str = "all"
                   ) -> Ablate:
    """Clamp the span of ``vectors`` ``[k, d]`` (or one ``[d]``), in every hook of
    ``reference_means``, at ``positions`` (every token, or e.g. the answer position: ``last``), to the reference
    model's mean there."""
    rows = orthonormal_rows(vectors.reshape(-1, vectors.shape[-1]).float().cpu())
    values = {h: (m.float().cpu() @ rows.T).tolist() for h, m in reference_means.items()}
    return Ablate(list(reference_means), rows, values, positions)


@dataclass(frozen=True)
class ProtocolResult:
    """One feature (latent, group or baseline direction) under the shared protocol."""

    steer_up_misaligned: float
    steer_up_valid: float
    steer_up_coef: float
    """the strength chosen, in residual-norm units x the unit (see ``scale``)"""
    clamp_before: float
    clamp_after: float
    clamp_valid_after: float
    per_finetuned: list[dict[str, Any]] = field(default_factory=list)
    """per misaligned model: clamp_before, clamp_after, clamp_valid_after, clamp_cut and its clamp_cut_ci95 (the
    headline figures average the rates)"""
    steer_up_ci95: tuple[float, float] | None = None
    """95% paired-bootstrap interval over the prompts (:func:`misfeat.stats.bootstrap_ci`) of steer_up_misaligned"""
    clamp_cut_ci95: tuple[float, float] | None = None
    """the same for the cut 1 - clamp_after / clamp_before (the rates averaged over the misaligned models)"""
    clamp_cut: float | None = None
    """that cut (:func:`misfeat.stats.cut`: 0 where nothing was misaligned before)"""

    def to_dict(self) -> dict[str, Any]:
        return {"steer_up_misaligned": self.steer_up_misaligned, "steer_up_valid": self.steer_up_valid,
                "steer_up_coef": self.steer_up_coef, "clamp_before": self.clamp_before,
                "clamp_after": self.clamp_after, "clamp_valid_after": self.clamp_valid_after,
                "steer_up_ci95": None if self.steer_up_ci95 is None else list(self.steer_up_ci95),
                "clamp_cut": self.clamp_cut,
                "clamp_cut_ci95": None if self.clamp_cut_ci95 is None else list(self.clamp_cut_ci95),
                "per_finetuned": self.per_finetuned}


def steer_strongest(directions: Sequence[torch.Tensor], aligned: HookedTransformer, prompts: PromptSet, hook: str,
                    scale: float, coefs: Sequence[float], positions: str, min_valid: float, batched: bool = True,
                    max_coef: float | None = None, bisect: int = 0, per_prompt: bool = False
                    ) -> list[tuple[float, dict[str, Any]]]:
    """Each direction (as a unit vector) steered up at ``c * scale`` in ``aligned`` for ``c`` in ``coefs`` (on past
    them up to ``max_coef`` while valid, then ``bisect`` rounds: :func:`~misfeat.features.screen.strongest`); per
    direction the (coef, rates) of its strongest coherent steering (``per_prompt``: with the prompts' rates, for
    :func:`run_protocol`'s intervals)."""
    units = [d.float().cpu() / d.float().norm() for d in directions]

    def steer_up(todo):
        return run_variants(aligned, prompts, [[Add(hook, units[j], c * scale, positions)] for j, c in todo], batched,
                            per_prompt)

    return strongest(steer_up, len(units), coefs, min_valid, True, max_coef, bisect)


def run_protocol(directions: Sequence[torch.Tensor], clamps: Sequence[Ablate], aligned: HookedTransformer,
                 misaligned: Sequence[HookedTransformer], prompts: PromptSet, hook: str, scale: float,
                 coefs: Sequence[float], positions: str, min_valid: float, before: list[dict[str, float]],
                 batched: bool = True, max_coef: float | None = None, bisect: int = 0,
                 steered: Sequence[tuple[float, dict[str, float]]] | None = None) -> list[ProtocolResult]:
    """Each direction steered up in ``aligned`` (:func:`steer_strongest`; ``steered``: its result where already
    measured) and each clamp applied in every misaligned model; ``before``: each misaligned model's unsteered
    rates. Where the rates hold their per-prompt values (``misaligned_each``: :func:`run_variants` with
    ``per_prompt``), each figure gets its 95% paired-bootstrap interval over the prompts."""
    ups = steered if steered is not None else steer_strongest(directions, aligned, prompts, hook, scale, coefs,
                                                              positions, min_valid, batched, max_coef, bisect,
                                                              per_prompt=True)
    after = [run_variants(m, prompts, [[c] for c in clamps], batched, per_prompt=True) for m in misaligned]
    out = []
    for j, (coef, up) in enumerate(ups):
        per = [{"clamp_before": b["misaligned_rate"], "clamp_after": a[j]["misaligned_rate"],
                "clamp_valid_after": a[j]["valid_rate"]} for b, a in zip(before, after, strict=True)]
        mean = {k: sum(p[k] for p in per) / len(per) for k in per[0]}
        paired = [(b.get("misaligned_each"), a[j]["misaligned_each"]) for b, a in zip(before, after, strict=True)]
        cut_ci = None
        if all(b is not None for b, _ in paired):
            for p, (b, a) in zip(per, paired, strict=True):
                p["clamp_cut"] = stats.cut(b, a)
                p["clamp_cut_ci95"] = list(stats.bootstrap_ci(stats.cut, b, a))
            cut_ci = stats.bootstrap_ci(stats.cut, [b for b, _ in paired], [a for _, a in paired])
        up_ci = stats.bootstrap_ci(stats.mean, up["misaligned_each"]) if "misaligned_each" in up else None
        out.append(ProtocolResult(up["misaligned_rate"], up["valid_rate"], coef, mean["clamp_before"],
                                  mean["clamp_after"], mean["clamp_valid_after"], per, up_ci, cut_ci,
                                  stats.cut([mean["clamp_before"]], [mean["clamp_after"]])))
    return out


@dataclass(frozen=True)
class Group:
    """The greedy group: its latents, each step's clamped rate, and its protocol figures."""

    latents: list[int]
    steps: list[dict[str, Any]]
    """per step: the group so far and the misaligned rate under its joint clamp (mean over models)"""
    clamp: Ablate = field(repr=False)
    """the joint clamp of the group's decoder subspace to the aligned model's level (every layer)"""
    direction: torch.Tensor = field(repr=False)
    """the group's steering direction (:func:`group_directions`: the one chosen)"""
    result: ProtocolResult
    steering: dict[str, dict[str, float]] = field(default_factory=dict)
    """per steering direction tried (:data:`GROUP_STEERING`): its strongest coherent steering
    (steer_up_misaligned, steer_up_valid, steer_up_coef)"""
    steer: str = "mean_diff"
    """the steering direction chosen (a key of ``steering``)"""


def select_group(sae: SAE, candidates: Sequence[int], misaligned: Sequence[HookedTransformer], prompts: PromptSet,
                 reference_means: dict[str, torch.Tensor], before: float | Sequence[float], *, cap: int = 8,
                 tol: float = 0.01, min_valid: float = 0.0, batched: bool = True,
                 steer_up: Callable[[list[list[int]]], list[float]] | None = None,
                 up0: float = 0.0, combine: str = "mean", positions: str = "all",
                 pursue: Callable[[list[int], list[int]], list[int]] | None = None
                 ) -> tuple[list[int], list[dict[str, Any]]]:
    """Greedy forward selection: start empty; at each step clamp (group + c) for every remaining
    candidate c (batched), keep the c with the lowest misaligned rate (mean over the misaligned
    models) among those whose clamped valid rate stays >= ``min_valid`` (a clamp that breaks the
    model is not a cut); stop at ``cap`` latents, when no candidate keeps the model valid, or
    when the rate falls by less than ``tol``.

    Two-sided (``steer_up`` given: per candidate group, the aligned model's misaligned rate steered along the
    group, ``up0`` unsteered): keep the c with the largest clamp fall plus steered rise, and stop when that sum
    grows by less than ``tol``.

    ``before``: the unclamped misaligned rate, one per misaligned model (or their mean). ``combine`` (a key of
    :data:`GROUP_COMBINING`): the clamp's fall is that of the mean rate (``mean``) or the mean rate before times
    the smallest relative cut over the models (``worst``, which needs one ``before`` per model); with one model
    the two are the same. ``positions``: where the joint clamp acts (:func:`subspace_clamp`).

    ``pursue`` (e.g. :func:`pursuit_candidates` bound to the misaligned models' mean differences): called at each
    step with the group and the remaining candidates, the latents it returns join the candidates before the step is
    scored (the step's ``pursued``), so that latents outside the screened pool that write what the group does not
    yet span can join."""
    if combine not in GROUP_COMBINING:
        raise MisfeatError(f"group combine must be one of {', '.join(GROUP_COMBINING)}, not {combine!r}")
    befores = [float(b) for b in before] if isinstance(before, Sequence) else [float(before)] * len(misaligned)
    if len(befores) != len(misaligned):
        raise MisfeatError(f"select_group: {len(befores)} unclamped rates for {len(misaligned)} misaligned models; "
                           "give one per model (or their mean)")
    w = sae.W_dec.detach().float().cpu()
    group: list[int] = []
    steps: list[dict[str, Any]] = []
    current, remaining = 0.0, [int(c) for c in candidates]
    while len(group) < cap:
        pursued = [int(c) for c in pursue(list(group), list(remaining))] if pursue is not None else []
        remaining += [c for c in pursued if c not in remaining and c not in group]
        if not remaining:
            break
        clamps = [[subspace_clamp(w[[*group, c]], reference_means, positions)] for c in remaining]
        per_model = [run_variants(m, prompts, clamps, batched) for m in misaligned]
        rates = [{k: sum(r[i][k] for r in per_model) / len(per_model) for k in ("misaligned_rate", "valid_rate")}
                 for i in range(len(remaining))]
        ok = [i for i in range(len(remaining)) if rates[i]["valid_rate"] >= min_valid]
        if not ok:
            break
        ups = steer_up([[*group, remaining[i]] for i in ok]) if steer_up is not None else [up0] * len(ok)
        falls = {i: _clamp_fall(befores, [r[i]["misaligned_rate"] for r in per_model], combine) for i in ok}
        score = {i: falls[i] + up - up0 for i, up in zip(ok, ups, strict=True)}
        i = max(ok, key=score.__getitem__)
        if group and score[i] - current < tol:
            break
        step: dict[str, Any] = {"latents": [*group, remaining[i]], "clamp_misaligned": rates[i]["misaligned_rate"],
                                "clamp_valid": rates[i]["valid_rate"]}
        if len(misaligned) > 1:
            step["clamp_misaligned_each"] = [r[i]["misaligned_rate"] for r in per_model]
        if steer_up is not None:
            step["steer_up_misaligned"] = ups[ok.index(i)]
        if pursue is not None:
            step["pursued"] = pursued
        group.append(remaining.pop(i))
        current = score[i]
        steps.append(step)
    return group, steps


def pursuit_candidates(decoder: torch.Tensor, vectors: Sequence[torch.Tensor], group: Sequence[int],
                       exclude: Collection[int], n: int = 1) -> list[int]:
    """Matching pursuit on the SAE's decoder: for each of ``vectors`` (e.g. each misaligned model's mean difference
    at the SAE's hook), the ``n`` latents whose decoder rows (``decoder`` ``[d_sae, d]``) have the largest
    absolute cosine with the part of the vector outside the span of the ``group``'s rows, leaving out ``exclude``
    and the latents already picked for an earlier vector. With an empty group: the rows closest to each vector."""
    import torch

    w = decoder.detach().float().cpu()
    unit = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    basis = orthonormal_rows(w[list(group)]) if len(group) else None
    picked: list[int] = []
    for v in vectors:
        v = v.detach().float().cpu().reshape(-1)
        r = v - (basis @ v) @ basis if basis is not None else v
        if float(r.norm()) <= 1e-6 * float(v.norm()):
            continue  # the group's span holds this vector already
        score = (unit @ r).abs()
        skip = sorted({int(i) for i in exclude} | set(picked))
        if skip:
            score[torch.tensor(skip, dtype=torch.long)] = -1.0
        picked += [int(i) for i in torch.argsort(score, descending=True)[:n] if float(score[i]) > 0]
    return picked


def _clamp_fall(before: Sequence[float], after: Sequence[float], combine: str) -> float:
    """The clamp's fall over several misaligned models (see :func:`select_group`): the mean rate's fall, or the
    mean rate before times the smallest relative cut among the models that had anything to cut."""
    mean_before = sum(before) / len(before)
    if combine == "mean":
        return mean_before - sum(after) / len(after)
    cuts = [(b - a) / b for b, a in zip(before, after, strict=True) if b > 0]
    return mean_before * min(cuts) if cuts else 0.0


GROUP_COMBINING = {"mean": "the fall of the misaligned rate averaged over the misaligned models",
                   "worst": "the smallest relative cut over the misaligned models (times the mean rate before, so "
                            "that with one model it is the plain fall): the group must cut each of them"}
"""how :func:`select_group` combines the clamp's fall over several misaligned models"""
GROUP_COMBINE = tuple(GROUP_COMBINING)


GROUP_SELECTION = {"clamp": "each step adds the latent whose joint clamp cuts the misaligned rate most",
                   "both": "each step adds the latent that most raises the joint clamp's fall plus the steered rise "
                           "(the group steered up in the base model at the strongest of coefs with valid >= "
                           "min_valid): the two-sided causal effect"}
"""how :func:`select_group` grows the group (``steer_up`` given: ``both``), as the summary describes it"""
GROUP_SELECT = tuple(GROUP_SELECTION)

GROUP_STEERING = {"best": "whichever of the two directions mean_diff and increase steers the base model to the higher "
                          "misaligned rate at valid >= min_valid (the screen's choice between latents)",
                  "mean_diff": "the mean-difference direction projected onto the span of their decoder rows",
                  "increase": "their decoder rows weighted by their activation increase"}
"""the group's steering directions (:func:`group_directions`), as the summary describes them"""
GROUP_STEER = tuple(GROUP_STEERING)


def group_directions(sae: SAE, latents: Sequence[int], increase: torch.Tensor, mean_diff: torch.Tensor,
                     steer: str = "best") -> dict[str, torch.Tensor]:
    """The group's candidate steering directions for ``steer`` (a key of :data:`GROUP_STEERING`): ``mean_diff``
    (:func:`group_direction` with the mean difference), ``increase`` (without it), or both for ``best``; for
    ``best`` the second is left out where the two are parallel (one latent: both are its decoder row)."""
    import torch

    named = {name: group_direction(sae, latents, increase, mean_diff if name == "mean_diff" else None)
             for name in (("mean_diff", "increase") if steer == "best" else (steer,))}
    if len(named) == 2 and float(torch.nn.functional.cosine_similarity(*named.values(), dim=0)) > 1 - 1e-6:
        del named["increase"]
    return named


def group_direction(sae: SAE, latents: Sequence[int], increase: torch.Tensor, mean_diff: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """The group's steering direction. With ``mean_diff`` (the fine-tune's mean activation change): its projection
    onto the span of the group's decoder rows, the part of the change that the group's subspace carries (the
    clamp removes exactly that part; a latent that rarely fires still contributes its row). Without it, or where
    the projection vanishes: the decoder rows weighted by their (positive) activation increase, equal weights
    where none rose (the change as the SAE's activations see it)."""
    import torch

    w = sae.W_dec.detach().float().cpu()[list(latents)]
    if mean_diff is not None:
        rows = orthonormal_rows(w)
        md = mean_diff.float().cpu()
        projected = rows.T @ (rows @ md)
        if float(projected.norm()) > 1e-6 * float(md.norm()):
            return projected
    weights = increase[list(latents)].float().cpu().clamp_min(0)
    if float(weights.sum()) == 0:
        weights = torch.ones(len(latents))
    return weights @ w


@dataclass(frozen=True)
class Families:
    """Decoder cosines and activation correlations among ``latents``."""

    latents: list[int]
    decoder_cosine: list[list[float]]
    coactivation: list[list[float]]
    """Pearson correlation of the latents' activations over the misaligned model's cached rows"""

    def to_dict(self) -> dict[str, Any]:
        return {"latents": self.latents, "decoder_cosine": self.decoder_cosine, "coactivation": self.coactivation}


def families(sae: SAE, latents: Sequence[int], store: Any, hook: str, max_rows: int = 65536) -> Families:
    """Which of ``latents`` form one family: decoder cosine matrix and co-activation on ``store``."""
    import torch

    from misfeat.features.diff import encode_rows

    latents = list(dict.fromkeys(int(i) for i in latents))
    w = sae.W_dec.detach().float().cpu()[latents]
    w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    z = encode_rows(sae, store.rows(hook, slice(0, min(store.n_rows, max_rows))))[:, latents].double()
    z = z - z.mean(0)
    sd = z.norm(dim=0)
    corr = (z.T @ z) / (sd[:, None] * sd[None, :]).clamp_min(1e-12)
    corr = torch.where((sd[:, None] > 0) & (sd[None, :] > 0), corr, torch.zeros_like(corr))
    return Families(latents, (w @ w.T).tolist(), corr.float().tolist())


def baseline_directions(diffs: Sequence[torch.Tensor], hook: str, seed: int = 0) -> dict[str, Direction]:
    """The mean-difference direction averaged over the misaligned models (``diffs``: each one's misaligned minus
    aligned activations at the same rows, :func:`misfeat.features.directions.mean_diff`) and a random direction of
    the same norm."""
    md = Direction(hook, sum(diffs) / len(diffs), {"method": "mean_diff", "n_finetuned": len(diffs)})
    return {"mean_diff": md, "random": random_like(md, seed)}
