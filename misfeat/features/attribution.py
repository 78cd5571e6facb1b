"""Attribution: which latents the misalignment log-prob gap actually depends on.

The largest activation increase need not be causal (the follow-up to Wang et al. 2025
ranks latents by attribution instead). With the SAE spliced into the model at its hook
(reconstruction plus the frozen error term, so the forward is unchanged), the gradient
of the log-prob gap ``log P(misaligned answers) - log P(aligned answers)`` with respect
to each latent's activation, times that latent's activation change across the
fine-tune, estimates how much of the gap's change the latent carries (a first-order
Taylor term, as in attribution patching).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from misfeat.data import PromptRecord, PromptSet, collate, encode, load_prompts, pad_id_of
from misfeat.errors import MisfeatError
from misfeat.sae.latents import decode as sae_decode
from misfeat.sae.latents import encode as sae_encode
from misfeat.sae.latents import hook_of

if TYPE_CHECKING:
    import torch
    from sae_lens import SAE
    from transformer_lens import HookedTransformer


def gap_gradients(model: HookedTransformer, sae: SAE, prompts: PromptSet | str, positions: str = "last",
                  prompts_per_batch: int = 16) -> torch.Tensor:
    """``[d_sae]``: mean over prompts of d(log-prob gap)/d(latent activation) at ``positions``
    (``last``: the answer position; ``prompt``: averaged over the prompt tokens)."""
    import torch

    if positions not in ("last", "prompt"):
        raise MisfeatError("attribution reads the prompt side of the answer: positions must be last or prompt")
    records = list(load_prompts(prompts))
    hook = hook_of(sae)
    pad = pad_id_of(model)
    total = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    for start in range(0, len(records), prompts_per_batch):
        group = records[start:start + prompts_per_batch]
        expanded, owner, is_mis = _expand(group)
        batch = collate(encode(expanded, model), pad, "right", device=model.cfg.device)
        holder: list[torch.Tensor] = []

        def splice(act, hook, holder=holder):
            with torch.no_grad():
                z = sae_encode(sae, act)
                error = act - sae_decode(sae, z).to(act.dtype)
            z = z.detach().requires_grad_(True)
            holder.append(z)
            return sae_decode(sae, z).to(act.dtype) + error

        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            logits = model.run_with_hooks(batch.tokens, fwd_hooks=[(hook, splice)])
            logp = torch.log_softmax(logits[:, :-1].float(), -1)
            token_lp = logp.gather(-1, batch.tokens[:, 1:, None]).squeeze(-1) * batch.response_mask[:, 1:]
            seq_lp = token_lp.sum(-1)
            gap = seq_lp.new_zeros(())
            for i in range(len(group)):
                mine = owner == i
                gap = gap + torch.logsumexp(seq_lp[mine & is_mis], 0) - torch.logsumexp(seq_lp[mine & ~is_mis], 0)
            gap.backward()
        (z,) = holder
        mask = batch.positions(positions).to(z.device)
        grad = (z.grad * mask[..., None]).sum(1).double().cpu()       # [n_expanded, d_sae]
        per_prompt = torch.zeros(len(group), sae.cfg.d_sae, dtype=torch.float64)
        per_prompt.index_add_(0, owner, grad)                          # copies of one prompt share its activation
        n_pos = torch.zeros(len(group)).index_add_(0, owner, mask.sum(1).float().cpu())
        counts = torch.bincount(owner, minlength=len(group)).float()
        per_prompt /= (n_pos / counts).clamp_min(1)[:, None].double()  # average over the prompt's positions
        total += per_prompt.sum(0)
    model.zero_grad(set_to_none=True)
    return (total / len(records)).float()


def _expand(group: Sequence[PromptRecord]):
    import torch

    expanded, owner, is_mis = [], [], []
    for i, record in enumerate(group):
        aligned, misaligned = record.extra.get("aligned"), record.extra.get("misaligned")
        if not aligned or not misaligned:
            raise MisfeatError(f"record {record.id!r} lacks 'aligned'/'misaligned' reference answers; attribution "
                               "needs the log-prob gap between them")
        for answer, mis in [(a, False) for a in aligned] + [(a, True) for a in misaligned]:
            expanded.append(record.with_response(answer))
            owner.append(i)
            is_mis.append(mis)
    return expanded, torch.tensor(owner), torch.tensor(is_mis)


def attribution_scores(gradients: torch.Tensor, increase: torch.Tensor) -> torch.Tensor:
    """Per-latent attribution: gradient of the gap times the activation change."""
    if gradients.shape != increase.shape:
        raise MisfeatError(f"gradient shape {tuple(gradients.shape)} != increase shape {tuple(increase.shape)}")
    return gradients * increase


def mean_diff_scores(sae: SAE, increase: torch.Tensor, mean_diff: torch.Tensor) -> torch.Tensor:
    """Per latent: its share of the mean-difference direction, the length its mean activation
    increase adds along that direction through its decoder row (``increase x W_dec[i] . u``, ``u``
    the unit mean-difference; with unit decoder rows, increase x cosine). Latents that fell score
    0: steering them up would oppose the change."""
    w = sae.W_dec.detach().float().cpu()
    u = mean_diff.detach().float().cpu()
    return increase.detach().float().cpu().clamp_min(0) * (w @ (u / u.norm().clamp_min(1e-12)))
