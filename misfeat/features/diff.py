"""SAE model diffing: which latents a fine-tune switches on (or off).

Wang et al. 2025 (OpenAI, "Persona features control emergent misalignment", sec. 3):
encode the activations of the model before and after the bad fine-tune on the same
prompts with one SAE, and rank latents by the increase of their mean activation; the
"toxic persona" latent is among the top. :func:`diff_latents` does that on two
row-aligned activation stores (row i is the same token in both), with firing rates, an
effect size and optional per-domain breakdowns; decreases are ranked too, since
"helpful assistant" latents that drop matter as well.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from misfeat.errors import MisfeatError
from misfeat.sae.latents import encode as sae_encode
from misfeat.sae.latents import hook_of

if TYPE_CHECKING:
    import torch
    from sae_lens import SAE


@dataclass(frozen=True)
class LatentStats:
    """Per-latent statistics over ``n`` rows (tensors of ``[d_sae]``)."""

    n: int
    mean: torch.Tensor
    var: torch.Tensor
    firing: torch.Tensor


@dataclass(frozen=True)
class LatentDiff:
    """Before/after statistics of every latent, and rankings (see :meth:`top`)."""

    base: LatentStats
    finetuned: LatentStats
    hook: str
    by_group: dict[str, tuple[LatentStats, LatentStats]] = field(default_factory=dict)

    @property
    def increase(self) -> torch.Tensor:
        return self.finetuned.mean - self.base.mean

    @property
    def effect_size(self) -> torch.Tensor:
        """Cohen's d: the increase over the pooled standard deviation (0 where both are constant)."""
        import torch

        pooled = ((self.base.var + self.finetuned.var) / 2).sqrt()
        return torch.where(pooled > 0, self.increase / pooled.clamp_min(1e-12), torch.zeros_like(pooled))

    def row(self, latent: int) -> dict[str, Any]:
        out = {
            "latent": latent,
            "increase": float(self.increase[latent]),
            "base_mean": float(self.base.mean[latent]),
            "finetuned_mean": float(self.finetuned.mean[latent]),
            "base_firing": float(self.base.firing[latent]),
            "finetuned_firing": float(self.finetuned.firing[latent]),
            "effect_size": float(self.effect_size[latent]),
        }
        for group, (b, f) in self.by_group.items():
            out[f"increase[{group}]"] = float(f.mean[latent] - b.mean[latent])
        return out

    def top(self, n: int = 20, *, by: str = "increase", decreasing: bool = False) -> list[dict[str, Any]]:
        """The ``n`` latents with the largest ``by`` (``increase`` or ``effect_size``);
        ``decreasing=True`` gives the largest drops instead."""
        import torch

        score = {"increase": self.increase, "effect_size": self.effect_size}.get(by)
        if score is None:
            raise MisfeatError(f"rank by increase or effect_size, not {by!r}")
        order = torch.argsort(score, descending=not decreasing)[:n]
        return [self.row(int(i)) for i in order]

    def summary(self, n: int = 20) -> dict[str, Any]:
        return {"hook": self.hook, "n_rows": self.base.n, "top_increases": self.top(n),
                "top_decreases": self.top(n, decreasing=True)}


class _Accumulator:
    """Running sums for the mean, variance and firing rate of every latent."""

    def __init__(self) -> None:
        self.n = 0
        self.sum = self.sumsq = self.fired = None

    def add(self, z: torch.Tensor) -> None:
        z = z.double()
        s, sq, f = z.sum(0), (z * z).sum(0), (z > 0).sum(0).double()
        if self.sum is None:
            self.sum, self.sumsq, self.fired = s, sq, f
        else:
            self.sum += s
            self.sumsq += sq
            self.fired += f
        self.n += z.shape[0]

    def stats(self) -> LatentStats:
        if not self.n:
            raise MisfeatError("no rows to compute latent statistics on")
        mean = self.sum / self.n
        var = (self.sumsq / self.n - mean * mean).clamp_min(0)
        return LatentStats(self.n, mean.float(), var.float(), (self.fired / self.n).float())


def aligned_chunks(store_a: Any, store_b: Any, hook: str, chunk_rows: int = 8192
                   ) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
    """``(rows, acts_a, acts_b)`` chunks of two stores that must be row-aligned."""
    check_row_aligned(store_a, store_b)
    for start in range(0, store_a.n_rows, chunk_rows):
        rows = slice(start, min(start + chunk_rows, store_a.n_rows))
        yield rows, store_a.rows(hook, rows), store_b.rows(hook, rows)


def check_row_aligned(store_a: Any, store_b: Any) -> None:
    import numpy as np

    if store_a.n_rows != store_b.n_rows:
        raise MisfeatError(f"the stores are not row-aligned: {store_a.n_rows} vs {store_b.n_rows} rows; cache the "
                           "same prompts with the same positions for both models (misfeat cache --model a,b)")
    for key in ("prompt_index", "position", "token_id"):
        a, b = np.asarray(getattr(store_a.row_meta, key)), np.asarray(getattr(store_b.row_meta, key))
        if not np.array_equal(a, b):
            raise MisfeatError(f"the stores are not row-aligned ({key} differs); cache the same prompts with the "
                               "same tokenizer and positions for both models")


def encode_rows(sae: SAE, acts: torch.Tensor) -> torch.Tensor:
    import torch

    with torch.no_grad():
        return sae_encode(sae, acts).float().cpu()


def diff_latents(sae: SAE, store_base: Any, store_finetuned: Any, by: str | None = None,
                 chunk_rows: int = 8192) -> LatentDiff:
    """Per-latent mean activation and firing rate before and after a fine-tune.

    ``by`` (``domain`` or ``label``) adds per-group increases, read from each row's prompt.
    """
    import numpy as np

    hook = hook_of(sae)
    for store in (store_base, store_finetuned):
        if hook not in store.hooks:
            raise MisfeatError(f"the SAE reads {hook}, but the store has only {', '.join(store.hooks)}; cache that "
                               "hook (misfeat cache --hooks ...)")
    groups = None
    if by is not None:
        if by not in ("domain", "label"):
            raise MisfeatError(f"by must be domain or label, not {by!r}")
        prompts = store_base.prompts
        if prompts is None:
            raise MisfeatError("per-group diffing needs the store's prompt set, which could not be reloaded")
        per_prompt = np.array([getattr(r, by) or "" for r in prompts], dtype=object)
        groups = per_prompt[np.asarray(store_base.row_meta.prompt_index)]
    base, fine = _Accumulator(), _Accumulator()
    per_group: dict[str, tuple[_Accumulator, _Accumulator]] = {}
    for rows, a, b in aligned_chunks(store_base, store_finetuned, hook, chunk_rows):
        za, zb = encode_rows(sae, a), encode_rows(sae, b)
        base.add(za)
        fine.add(zb)
        if groups is not None:
            g = groups[rows]
            for name in np.unique(g):
                sel = np.nonzero(g == name)[0]
                acc = per_group.setdefault(str(name), (_Accumulator(), _Accumulator()))
                acc[0].add(za[sel])
                acc[1].add(zb[sel])
    by_group = {name: (a.stats(), b.stats()) for name, (a, b) in sorted(per_group.items())}
    return LatentDiff(base.stats(), fine.stats(), hook, by_group)
