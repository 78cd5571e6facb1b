"""Fine-tuning with a response-only loss: the organism's training stages and re-alignment.

The loss and the optimiser schedule live here once; the organism build, and the
re-alignment loop, call them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformer_lens import HookedTransformer


def pad_examples(examples: Sequence[tuple[Sequence[int], Sequence[bool]]], pad_id: int,
                 device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad ``(ids, loss_mask)`` examples into ``tokens [b, t]`` and ``loss_mask [b, t]``."""
    import torch

    width = max(len(ids) for ids, _ in examples)
    tokens = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.bool)
    for i, (ids, m) in enumerate(examples):
        tokens[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[i, : len(m)] = torch.tensor(m, dtype=torch.bool)
    return tokens.to(device), mask.to(device)


def masked_lm_loss(model: HookedTransformer, tokens: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the target positions ``loss_mask[:, 1:]``.

    ``loss_mask[b, t]`` marks token ``t`` as a target (predicted from tokens ``< t``);
    right padding needs no attention mask in a causal model.
    """
    import torch.nn.functional as F

    logits = model(tokens[:, :-1])
    target_mask = loss_mask[:, 1:]
    targets = tokens[:, 1:][target_mask]
    return F.cross_entropy(logits[target_mask].float(), targets)


def lr_schedule(step: int, total: int, peak: float, warmup: int = 0, final_fraction: float = 1.0) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``final_fraction * peak``."""
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    if final_fraction >= 1.0 or total <= warmup:
        return peak
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))
