"""The shared pieces of every fine-tune: padding, the response-only loss, the learning-rate
schedule, parameter selection and the legacy ``LossTerm`` protocol.

The organism build calls :func:`pad_examples`, :func:`masked_lm_loss` and
:func:`lr_schedule`; their numerics must not change (the cached organism depends on them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from misfeat.errors import MisfeatError

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


class LossTerm(Protocol):
    """One additive term of the fine-tuning loss, computed on a batch with its own forward
    (the legacy seam of :func:`misfeat.finetune.realign`; new code writes a
    :class:`misfeat.finetune.Defence`, whose penalty reuses the engine's shared forward)."""

    name: str

    def __call__(self, model: HookedTransformer, batch: TrainBatch) -> torch.Tensor: ...


@dataclass(frozen=True)
class TrainBatch:
    """``tokens [b, t]`` right-padded; ``loss_mask [b, t]`` marks response tokens (the targets);
    ``attention_mask [b, t]`` the real (non-pad) tokens (None: every token is real)."""

    tokens: torch.Tensor
    loss_mask: torch.Tensor
    attention_mask: torch.Tensor | None = None

    def input_masks(self) -> dict[str, torch.Tensor]:
        """Position masks of the model input ``tokens[:, :-1]`` (for :func:`misfeat.hooks.position_masks`):
        ``all`` (non-pad), ``prompt``, ``response`` and ``last`` (the last prompt token)."""
        import torch

        attention = self.attention_mask if self.attention_mask is not None else torch.ones_like(self.loss_mask)
        attention, response = attention[:, :-1], self.loss_mask[:, :-1]
        prompt = attention & ~response
        nxt = torch.cat([prompt[:, 1:], torch.zeros_like(prompt[:, :1])], dim=1)
        return {"all": attention, "prompt": prompt, "response": response, "last": prompt & ~nxt}


def make_batch(examples: Sequence[tuple[Sequence[int], Sequence[bool]]], pad_id: int,
               device: str | torch.device = "cpu") -> TrainBatch:
    """:func:`pad_examples` plus the attention mask of the real tokens."""
    import torch

    tokens, mask = pad_examples(examples, pad_id, device)
    lengths = torch.tensor([len(ids) for ids, _ in examples], device=tokens.device)
    attention = torch.arange(tokens.shape[1], device=tokens.device)[None, :] < lengths[:, None]
    return TrainBatch(tokens, mask, attention)


@dataclass(frozen=True)
class ResponseLoss:
    """Next-token cross-entropy on the response tokens only."""

    weight: float = 1.0
    name: str = "response_ce"

    def __call__(self, model, batch):
        return self.weight * masked_lm_loss(model, batch.tokens, batch.loss_mask)


@dataclass(frozen=True, eq=False)
class KLToReference:
    """KL(reference || model) of next-token distributions on the response positions (legacy
    term kept for existing callers; the defence of Kaczer et al. is :class:`misfeat.finetune.KL`,
    reverse KL(model || reference) over all non-pad tokens)."""

    reference: Any
    weight: float = 0.1
    name: str = "kl_reference"

    def __call__(self, model, batch):
        import torch
        import torch.nn.functional as F

        mask = batch.loss_mask[:, 1:]
        logp = torch.log_softmax(model(batch.tokens[:, :-1])[mask].float(), -1)
        with torch.no_grad():
            ref = torch.log_softmax(self.reference(batch.tokens[:, :-1])[mask].float(), -1)
        return self.weight * F.kl_div(logp, ref, log_target=True, reduction="batchmean")


def select_parameters(model: HookedTransformer, params: str | Sequence[str]) -> list[tuple[str, Any]]:
    """The named parameters ``params`` selects (see :class:`RealignConfig`); others are frozen.

    Parameters TransformerLens adds that the model's Hugging Face architecture lacks (the
    zero biases of Llama, Qwen2, Gemma ...) are never selected, so a fine-tuned model still
    exports to Hugging Face (see :func:`misfeat.export.absent_in_hf`)."""
    from misfeat.export import absent_in_hf

    absent = absent_in_hf(model)
    named = [(n, p) for n, p in model.named_parameters() if n not in absent]
    if params == "all":
        return named
    if params in ("mlp", "attn"):
        chosen = [(n, p) for n, p in named if f".{params}." in n]
    elif isinstance(params, str) and params.startswith("layers:"):
        try:
            layers = {int(x) for x in params.split(":", 1)[1].split(",") if x.strip()}
        except ValueError:
            raise MisfeatError(f"params {params!r}: expected layers:0,2") from None
        bad = [i for i in layers if not 0 <= i < model.cfg.n_layers]
        if bad:
            raise MisfeatError(f"params {params!r}: the model has blocks 0..{model.cfg.n_layers - 1}")
        chosen = [(n, p) for n, p in named if n.startswith("blocks.") and int(n.split(".")[1]) in layers]
    else:
        prefixes = (params,) if isinstance(params, str) else tuple(params)
        chosen = [(n, p) for n, p in named if n.startswith(prefixes)]
    if not chosen:
        raise MisfeatError(f"params {params!r} selects no parameter; use all, mlp, attn, layers:<i,j> or name "
                           f"prefixes such as {named[0][0]}")
    return chosen
