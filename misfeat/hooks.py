"""Hook plumbing shared by the cache, the interventions and the evaluation.

- :func:`position_masks`: the token masks (``prompt``, ``response``, ``last``, ``all``) of
  the forward pass in flight, so that an intervention restricted to ``positions='last'``
  knows which positions those are, also during generation with a KV cache.
- :func:`check_hooks`: validate hook names against a model with a helpful message.
- :func:`last_layer_of`: the block index after which a forward can stop.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING

from misfeat.errors import MisfeatError

if TYPE_CHECKING:
    import torch
    from transformer_lens import HookedTransformer

_MASKS: ContextVar[dict[str, torch.Tensor] | None] = ContextVar("misfeat_position_masks", default=None)
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


@contextlib.contextmanager
def position_masks(masks: dict[str, torch.Tensor]) -> Iterator[None]:
    """Declare the ``[batch, seq]`` boolean masks of the forward passes run inside.

    ``masks`` maps ``all``, ``prompt``, ``response`` and ``last`` to masks over the
    positions of the tokens passed to the model in this call (during KV-cached generation:
    only the new tokens, which count as ``response``).
    """
    token = _MASKS.set(masks)
    try:
        yield
    finally:
        _MASKS.reset(token)


def current_masks() -> dict[str, torch.Tensor] | None:
    return _MASKS.get()


def mask_for(positions: str, shape: Sequence[int]) -> torch.Tensor | None:
    """The mask for ``positions`` in the forward in flight; ``None`` means every position.

    Raises a clear error when a restricted position set is asked for outside a
    :func:`position_masks` block, or when the masks do not fit the activation.
    """
    if positions == "all":
        masks = _MASKS.get()
        return None if masks is None else masks["all"]
    masks = _MASKS.get()
    if masks is None:
        raise MisfeatError(
            f"positions={positions!r} needs to know which tokens are prompt and response: run the model "
            "through misfeat (evaluate, generate, steer_sweep), or pass the batch's masks explicitly: "
            "apply(model, intervention, masks=batch.masks()) with batch = misfeat.data.collate(...)"
        )
    if positions not in masks:
        raise MisfeatError(f"unknown positions {positions!r}; use all, prompt, response or last")
    mask = masks[positions]
    if tuple(mask.shape) != tuple(shape[:2]):
        raise MisfeatError(
            f"position masks of shape {tuple(mask.shape)} do not fit an activation of shape {tuple(shape)}; "
            "declare the masks of the tokens actually passed to the model"
        )
    return mask


def block_of(hook: str) -> int | None:
    """The block index a hook name belongs to (``blocks.3.hook_resid_post`` -> 3), else None."""
    match = _BLOCK.match(hook)
    return int(match.group(1)) if match else None


def check_hooks(model: HookedTransformer, hooks: Sequence[str]) -> list[str]:
    """Return ``hooks`` as a list if all exist on ``model``; else raise naming the valid ones."""
    hooks = list(hooks)
    if not hooks:
        raise MisfeatError("no hook names given; e.g. blocks.1.hook_resid_post")
    valid = model.hook_dict
    unknown = [h for h in hooks if h not in valid]
    if unknown:
        n = model.cfg.n_layers
        examples = [h for h in sorted(valid) if h.startswith("blocks.0.") and "attn.hook_" not in h][:12]
        top = [h for h in ("hook_embed", "hook_pos_embed", "ln_final.hook_normalized") if h in valid]  # rotary: no pos_embed
        raise MisfeatError(
            f"unknown hook(s) {', '.join(unknown)} for this model ({n} blocks, numbered 0..{n - 1}). "
            f"Valid names include {', '.join(top)}{' and' if top else ''} per block "
            f"{', '.join(e.replace('blocks.0.', 'blocks.L.') for e in examples)}; "
            "see `misfeat inspect --model SPEC` for the full list"
        )
    return hooks


def last_layer_of(hooks: Sequence[str], n_layers: int) -> int | None:
    """``stop_at_layer`` for a forward that only needs ``hooks``: one past the last block
    they touch, or None when a hook lies after the blocks (``ln_final``, ``unembed``)."""
    last = -1
    for hook in hooks:
        block = block_of(hook)
        if block is None:
            if hook.startswith(("hook_embed", "hook_pos_embed", "hook_tokens")):
                continue
            return None
        last = max(last, block)
    stop = last + 1
    return None if stop >= n_layers else stop
