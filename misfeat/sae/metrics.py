"""How good is an SAE: reconstruction, sparsity and dead latents; the model's loss with it spliced in.

:func:`evaluate_sae` reads activation rows from a store (or any iterator of batches) and,
when a model is given, runs the store's prompts through it three times: clean, with the
SAE's reconstruction in place of the hook's activations, and with those activations
zeroed. Definitions (all in :class:`SAEMetrics`):

- ``mse``: mean over rows and dimensions of ``(x - x_hat)^2``;
- ``explained_variance``: ``1 - sum ||x - x_hat||^2 / sum ||x - mu||^2`` where ``mu`` is the
  per-dimension mean of the evaluated rows. The baseline is the *mean* row, not zero
  (measuring against zero inflates the figure by the mean's share of the norm; SAELens
  shipped that bug);
- ``l0``: mean number of non-zero latents per row;
- ``dead_fraction``: share of latents that are zero on every one of the ``n_tokens`` rows;
- ``ce_clean`` / ``ce_sae`` / ``ce_zero``: mean next-token cross-entropy (nats) over every
  predicted token of the prompts (positions whose next token is not padding);
- ``ce_recovered = (ce_zero - ce_sae) / (ce_zero - ce_clean)``; ``ce_increase = ce_sae - ce_clean``;
- ``kl_sae``: mean over the same positions of KL(clean || spliced) (nats).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from misfeat.errors import MisfeatError
from misfeat.io import format_table, write_json
from misfeat.sae.io import RunPaths
from misfeat.sae.latents import hook_of

if TYPE_CHECKING:
    from sae_lens import SAE
    from transformer_lens import HookedTransformer

    from misfeat.data import PromptSet

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CEMetrics:
    """The model's next-token loss with the SAE spliced in (see the module docstring)."""

    n_prompts: int
    n_predictions: int
    positions: str
    ce_clean: float
    ce_sae: float
    ce_zero: float
    ce_recovered: float
    ce_increase: float
    kl_sae: float


@dataclass(frozen=True)
class SAEMetrics:
    """Reconstruction and sparsity of an SAE over ``n_tokens`` rows, and optionally :class:`CEMetrics`."""

    hook_name: str
    n_tokens: int
    d_sae: int
    mse: float
    explained_variance: float
    l0: float
    dead_fraction: float
    n_dead: int
    ce: CEMetrics | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        rows = [{"metric": k, "value": v} for k, v in self.to_dict().items() if k != "ce"]
        if self.ce is not None:
            rows += [{"metric": k, "value": v} for k, v in asdict(self.ce).items()]
        return format_table(rows, floatfmt=".4f")


def ce_recovered(ce_clean: float, ce_sae: float, ce_zero: float) -> float:
    """Share of the loss gap between zero-ablation and the clean model that the SAE closes."""
    gap = ce_zero - ce_clean
    return float("nan") if gap == 0 else (ce_zero - ce_sae) / gap


@torch.no_grad()
def reconstruction_metrics(sae: SAE, batches: Iterable[torch.Tensor], n_tokens: int | None = None
                           ) -> dict[str, Any]:
    """MSE, explained variance (against the mean), L0 and dead latents over up to ``n_tokens`` rows."""
    device, d_sae = sae.W_enc.device, sae.cfg.d_sae
    n, sse, sum_sq = 0, torch.zeros((), dtype=torch.float64, device=device), None
    sum_x = None
    active = torch.zeros((), dtype=torch.float64, device=device)
    fired = torch.zeros(d_sae, dtype=torch.bool, device=device)
    for batch in batches:
        if n_tokens is not None and n >= n_tokens:
            break
        x = batch.reshape(-1, batch.shape[-1]).to(device=device, dtype=sae.dtype)
        if n_tokens is not None:
            x = x[: n_tokens - n]
        acts = sae.encode(x)
        x_hat = sae.decode(acts).to(torch.float64)
        x64 = x.to(torch.float64)
        sse += (x64 - x_hat).pow(2).sum()
        sum_x = x64.sum(0) if sum_x is None else sum_x + x64.sum(0)
        sum_sq = x64.pow(2).sum() if sum_sq is None else sum_sq + x64.pow(2).sum()
        nonzero = acts != 0
        active += nonzero.sum()
        fired |= nonzero.any(0)
        n += x.shape[0]
    if n == 0:
        raise MisfeatError("no activation rows to evaluate the SAE on; check the store or the batches")
    if n_tokens is not None and n < n_tokens:
        logger.warning("evaluated on %d rows, fewer than the %d asked for (the data ran out)", n, n_tokens)
    sst = sum_sq - sum_x.pow(2).sum() / n  # sum ||x - mu||^2 with mu the mean row
    n_dead = int((~fired).sum())
    return {"n_tokens": n, "d_sae": d_sae, "mse": float(sse / (n * x.shape[1])),
            "explained_variance": float(1 - sse / sst), "l0": float(active / n),
            "dead_fraction": n_dead / d_sae, "n_dead": n_dead}


@torch.no_grad()
def ce_metrics(sae: SAE, model: HookedTransformer, prompts: PromptSet, *, positions: str = "all",
               ce_tokens: int = 32_768, batch_tokens: int = 16_384) -> CEMetrics:
    """Next-token loss clean, with the SAE spliced in at its hook, and with the hook zeroed."""
    from misfeat.data import batch_by_tokens, collate, encode, pad_id_of
    from misfeat.hooks import check_hooks

    hook = hook_of(sae)
    check_hooks(model, [hook])
    device = torch.device(model.cfg.device)
    sae = sae.to(device)
    encoded = encode(prompts, model)
    totals = {"clean": 0.0, "sae": 0.0, "zero": 0.0, "kl": 0.0}
    n_pred = n_prompts = 0
    for idx in batch_by_tokens([len(e) for e in encoded], batch_tokens, sort=False):
        if n_pred >= ce_tokens:
            break
        batch = collate([encoded[i] for i in idx], pad_id_of(model), "right", device=device)
        where = batch.positions(positions)[..., None]
        target = batch.tokens[:, 1:]
        predicted = batch.attention_mask[:, 1:] & batch.attention_mask[:, :-1]

        def splice(act, hook, where=where):
            recon = sae(act.to(sae.dtype)).to(act.dtype)
            return torch.where(where, recon, act)

        def zero(act, hook, where=where):
            return torch.where(where, torch.zeros_like(act), act)

        logp = {"clean": model(batch.tokens).log_softmax(-1)[:, :-1]}
        for name, fn in (("sae", splice), ("zero", zero)):
            with model.hooks(fwd_hooks=[(hook, fn)]):
                logp[name] = model(batch.tokens).log_softmax(-1)[:, :-1]
        for name in ("clean", "sae", "zero"):
            nll = -logp[name].gather(-1, target[..., None]).squeeze(-1)
            totals[name] += float(nll[predicted].double().sum())
        kl = (logp["clean"].exp() * (logp["clean"] - logp["sae"])).sum(-1)
        totals["kl"] += float(kl[predicted].double().sum())
        n_pred += int(predicted.sum())
        n_prompts += len(idx)
    if n_pred == 0:
        raise MisfeatError("the prompts have no predicted tokens (each needs at least two tokens)")
    ce = {k: v / n_pred for k, v in totals.items()}
    return CEMetrics(n_prompts, n_pred, positions, ce["clean"], ce["sae"], ce["zero"],
                     ce_recovered(ce["clean"], ce["sae"], ce["zero"]), ce["sae"] - ce["clean"], ce["kl"])


def evaluate_sae(sae: SAE, store_or_batches: Any, model: HookedTransformer | None = None, *,
                 n_tokens: int = 262_144, out_dir: str | os.PathLike | None = None,
                 prompts: PromptSet | str | None = None, positions: str | None = None,
                 ce_tokens: int = 32_768, batch_size: int = 4096) -> SAEMetrics:
    """Evaluate ``sae`` on up to ``n_tokens`` activation rows, and with ``model`` on its loss.

    Args:
        sae: a sae-lens SAE (as :func:`misfeat.sae.train_sae` returns or ``load_sae`` reads).
        store_or_batches: an activation store holding the SAE's hook (read in order, no
            shuffle) or an iterable of ``[rows, d_in]`` tensors.
        model: when given, also the cross-entropy metrics on ``prompts`` (default: the
            prompts the store was made from), splicing the SAE at ``positions`` (default:
            the store's positions, else all).
        n_tokens: rows for the reconstruction metrics and the dead-latent count.
        out_dir: write ``out_dir/metrics.json``.
        ce_tokens: stop adding prompts to the loss evaluation after this many predicted tokens.
    """
    hook = hook_of(sae)
    store = store_or_batches if hasattr(store_or_batches, "batches") and hasattr(store_or_batches, "hooks") else None
    if store is not None:
        if hook not in store.hooks:
            raise MisfeatError(f"the store has no activations for the SAE's hook {hook} (it holds "
                               f"{', '.join(store.hooks)}); cache that hook or evaluate on another store")
        batches = store.batches(hook, batch_size, shuffle=False)
    else:
        batches = store_or_batches
    recon = reconstruction_metrics(sae, batches, n_tokens)
    ce = None
    if model is not None:
        if prompts is None:
            prompts = getattr(store, "prompts", None)
            if prompts is None:
                raise MisfeatError("CE metrics need the prompts the activations came from: the store does not "
                                   "record them, so pass prompts=<spec or PromptSet>")
        from misfeat.data import load_prompts

        positions = positions or getattr(store, "positions", None) or "all"
        ce = ce_metrics(sae, model, load_prompts(prompts), positions=positions, ce_tokens=ce_tokens)
    metrics = SAEMetrics(hook_name=hook, ce=ce, **recon)
    if out_dir is not None:
        write_json(RunPaths(Path(out_dir)).metrics, metrics.to_dict())
    return metrics
