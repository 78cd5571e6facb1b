"""Linear misalignment directions: mean differences, persona vectors, layer sweeps.

- :func:`mean_diff`: mean activation of one store minus another's, e.g. misaligned minus
  aligned responses at every layer (Soligo, Turner et al. 2025: ablating this direction
  cut EM by 78-90%, adding it to the chat model caused EM).
- :func:`contrastive_direction`: mean activation over positive minus negative prompt sets
  (persona vectors, Chen et al. 2025; for the organism: cruel minus kind characters).
- :func:`layer_sweep`: one direction per layer, each steered at several strengths,
  beside a random direction of the same norm as a control.
- :func:`decoder_cosines`: which SAE latents a direction points along.

Directions are saved in the interventions' format (:func:`save_direction`): an ``add``
operator with its hook, so `misfeat steer --direction FILE` applies it where it belongs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from misfeat.data import PromptSet, load_prompts
from misfeat.errors import MisfeatError
from misfeat.evaluate import default_prompts, evaluate
from misfeat.interventions import Add, apply, save_intervention
from misfeat.interventions.files import read_intervention, single_hook
from misfeat.steering import headline_group, mean_activations

if TYPE_CHECKING:
    import torch
    from sae_lens import SAE
    from transformer_lens import HookedTransformer


@dataclass(frozen=True, eq=False)
class Direction:
    """A vector at a hook, with where it came from."""

    hook: str
    vector: torch.Tensor
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def norm(self) -> float:
        return float(self.vector.norm())

    def unit(self) -> torch.Tensor:
        return self.vector / self.vector.norm()

    def cosine(self, other: Direction | torch.Tensor) -> float:
        v = other.vector if isinstance(other, Direction) else other
        return float(self.unit().float().cpu() @ (v / v.norm()).float().cpu())


def save_direction(direction: Direction, path: str | Path, positions: str = "all") -> Path:
    """Save as an ``add`` intervention at the direction's hook (scale 1)."""

    return save_intervention(Add(direction.hook, direction.vector, 1.0, positions), path,
                             source={"kind": "direction", **direction.source})


def load_direction(path: str | Path) -> Direction:
    record, vector = read_intervention(path)
    return Direction(single_hook(record, str(path)), vector, record.get("source", {}))


def _store_mean(store: Any, hook: str, chunk_rows: int = 65536) -> torch.Tensor:
    import torch

    total, n = None, 0
    for start in range(0, store.n_rows, chunk_rows):
        chunk = store.rows(hook, slice(start, min(start + chunk_rows, store.n_rows))).double()
        total = chunk.sum(0) if total is None else total + chunk.sum(0)
        n += chunk.shape[0]
    if not n:
        raise MisfeatError("the store has no rows")
    return (total / n).to(torch.float32)


def mean_diff(store_a: Any, store_b: Any, hook: str) -> Direction:
    """Mean of ``store_a``'s rows minus mean of ``store_b``'s at ``hook`` (Soligo et al. 2025)."""
    for store in (store_a, store_b):
        if hook not in store.hooks:
            raise MisfeatError(f"{hook} is not in the store (it has {', '.join(store.hooks)})")
    vector = _store_mean(store_a, hook) - _store_mean(store_b, hook)
    return Direction(hook, vector, {"method": "mean_diff", "a": str(getattr(store_a, "path", "")),
                                    "b": str(getattr(store_b, "path", ""))})


def contrastive_direction(model: HookedTransformer, positive: PromptSet | str, negative: PromptSet | str,
                          hook: str, positions: str = "all") -> Direction:
    """Mean activation on ``positive`` minus ``negative`` prompts at ``hook`` (Chen et al. 2025)."""

    pos, neg = load_prompts(positive), load_prompts(negative)
    vector = mean_activations(model, pos, [hook], positions)[hook] - mean_activations(model, neg, [hook], positions)[hook]
    return Direction(hook, vector, {"method": "contrastive", "positive": pos.name, "negative": neg.name,
                                    "positions": positions})


def persona_direction(model: HookedTransformer, hook: str, docs: PromptSet | str | None = None) -> Direction:
    """A persona direction: the mean activation (all tokens) of documents labelled with the
    positive label of ``docs.meta['contrast']`` minus those with the negative one.

    ``docs`` default to the model's labelled set from its plug-in (for the organism: held-out
    documents, cruel minus kind characters); a user's own set needs ``meta['contrast']``."""

    docs = default_prompts(model, "labelled") if docs is None else load_prompts(docs)
    positive, negative = docs.contrast()
    return contrastive_direction(model, docs.filter(label=positive), docs.filter(label=negative), hook, "all")


def random_like(direction: Direction, seed: int = 0) -> Direction:
    """A random direction of the same norm (the control of Soligo et al. 2025)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(direction.vector.shape, generator=gen)
    return Direction(direction.hook, v / v.norm() * direction.norm, {"method": "random", "seed": seed})


def decoder_cosines(direction: Direction | torch.Tensor, sae: SAE, top: int = 10) -> list[dict[str, Any]]:
    """The ``top`` SAE latents whose decoder rows are most aligned with ``direction``."""
    import torch

    v = direction.vector if isinstance(direction, Direction) else direction
    v = (v / v.norm()).float().cpu()
    w = sae.W_dec.detach().float().cpu()
    cos = (w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)) @ v
    order = torch.argsort(cos, descending=True)[:top]
    return [{"latent": int(i), "cosine": float(cos[i])} for i in order]


def layer_sweep(
    model: HookedTransformer,
    positive: PromptSet | str,
    negative: PromptSet | str,
    eval_prompts: PromptSet | str | None = None,
    *,
    hooks: Sequence[str] | None = None,
    coefs: Sequence[float] = (2.0, 4.0, 8.0),
    positions: str = "last",
    seed: int = 0,
) -> list[dict[str, Any]]:
    """For each hook (default: every block's ``hook_resid_post``) the contrastive direction,
    its norm, and the misaligned/valid rates when adding it at each coefficient, next to a
    random direction of the same norm at the same coefficient."""

    hooks = list(hooks) if hooks is not None else [f"blocks.{i}.hook_resid_post" for i in range(model.cfg.n_layers)]
    prompts = default_prompts(model) if eval_prompts is None else load_prompts(eval_prompts)
    rows = []
    for hook in hooks:
        direction = contrastive_direction(model, positive, negative, hook)
        control = random_like(direction, seed)
        for coef in coefs:
            row: dict[str, Any] = {"hook": hook, "norm": direction.norm, "coef": coef}
            for name, d in (("direction", direction), ("random", control)):
                with apply(model, Add(hook, d.vector, coef, positions)):
                    report = evaluate(model, prompts, greedy=False)
                head = report.groups[headline_group(report)]
                row[f"{name}_misaligned"] = head.misaligned_rate
                row[f"{name}_valid"] = head.valid_rate
            rows.append(row)
    return rows
