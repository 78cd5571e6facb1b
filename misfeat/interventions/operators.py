"""The operators: :class:`Add`, :class:`Ablate`, :class:`ClampLatent`, and :func:`apply`."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from misfeat.data import POSITIONS
from misfeat.errors import MisfeatError
from misfeat.hooks import check_hooks, mask_for, position_masks
from misfeat.sae.latents import hook_of, latent_delta

if TYPE_CHECKING:
    import torch
    from sae_lens import SAE
    from transformer_lens import HookedTransformer

OPS = ("add", "ablate", "clamp")


def _check_positions(positions: str) -> None:
    if positions not in POSITIONS:
        raise MisfeatError(f"unknown positions {positions!r}; use one of {', '.join(POSITIONS)}")


def _where(positions: str, act: torch.Tensor) -> torch.Tensor | None:
    """``[batch, seq, 1...]`` float mask broadcastable to ``act``, or None for every position."""
    mask = mask_for(positions, act.shape)
    if mask is None:
        return None
    return mask.to(act.device, act.dtype).reshape(*mask.shape, *([1] * (act.dim() - 2)))


def resolve_hooks(model: HookedTransformer, hooks: str | Sequence[str]) -> list[str]:
    """``"all"`` -> the residual stream entering every block and leaving the last one."""
    if hooks == "all":
        n = model.cfg.n_layers
        return [f"blocks.{i}.hook_resid_pre" for i in range(n)] + [f"blocks.{n - 1}.hook_resid_post"]
    return check_hooks(model, [hooks] if isinstance(hooks, str) else list(hooks))


class Intervention:
    """Base class: an operator on the activations of one or more hooks.

    Subclasses implement :meth:`edit` (the activation after the operator) and
    :meth:`with_coef` (the same operator at another strength, for sweeps).
    """

    op: str
    positions: str

    def hook_names(self, model: HookedTransformer) -> list[str]:
        raise NotImplementedError

    def edit(self, act: torch.Tensor, hook: str) -> torch.Tensor:
        raise NotImplementedError

    def with_coef(self, coef: float) -> Intervention:
        raise NotImplementedError

    def check(self, model: HookedTransformer) -> None:
        """Raise a clear error if this operator cannot apply to ``model``."""
        for hook in self.hook_names(model):
            d = _hook_width(model, hook)
            if d is not None and self.width is not None and d != self.width:
                raise MisfeatError(f"{type(self).__name__} has a {self.width}-dim vector but {hook} of this model "
                                   f"has width {d}; was it made for another model or hook?")

    @property
    def width(self) -> int | None:
        return None

    def on(self, model: HookedTransformer):
        """Context manager applying this operator to ``model``."""
        return apply(model, self)

    def describe(self) -> dict[str, Any]:
        return {"op": self.op, "positions": self.positions}


def _hook_width(model: HookedTransformer, hook: str) -> int | None:
    """The last dimension of a residual-stream hook (d_model), None for other hooks."""
    if "resid" in hook or hook in ("hook_embed", "hook_pos_embed") or hook.endswith(("attn_out", "mlp_out")):
        return model.cfg.d_model
    if hook.endswith(("mlp.hook_post", "mlp.hook_pre")):
        return model.cfg.d_mlp
    return None


@dataclass(frozen=True, eq=False)
class Add(Intervention):
    """Add ``scale * vector`` at ``hook`` (the vector as given: scale 1 adds it once)."""

    hook: str | Sequence[str]
    vector: torch.Tensor
    scale: float = 1.0
    positions: str = "all"
    op: str = field(default="add", init=False)

    def __post_init__(self) -> None:
        _check_positions(self.positions)

    @property
    def width(self) -> int:
        return int(self.vector.shape[-1])

    def hook_names(self, model):
        return resolve_hooks(model, self.hook)

    def edit(self, act, hook):
        delta = (self.scale * self.vector).to(act.device, act.dtype)
        where = _where(self.positions, act)
        return act + delta if where is None else act + where * delta

    def with_coef(self, coef):
        return dataclasses.replace(self, scale=float(coef))

    def describe(self):
        return {**super().describe(), "hook": self.hook, "scale": self.scale}


@dataclass(frozen=True, eq=False)
class Ablate(Intervention):
    """Project ``direction`` out of the activations at ``hooks`` (``"all"``: every layer's
    residual), or, with ``value``, set the coordinate along the unit direction to it
    (a float, or a dict hook -> float, e.g. a reference model's mean per layer)."""

    hooks: str | Sequence[str]
    direction: torch.Tensor
    value: float | dict[str, float] | None = None
    positions: str = "all"
    op: str = field(default="ablate", init=False)

    def __post_init__(self) -> None:
        _check_positions(self.positions)
        if float(self.direction.norm()) == 0.0:
            raise MisfeatError("cannot ablate a zero direction")

    @property
    def width(self) -> int:
        return int(self.direction.shape[-1])

    def hook_names(self, model):
        return resolve_hooks(model, self.hooks)

    def target(self, hook: str) -> float:
        if self.value is None:
            return 0.0
        if isinstance(self.value, dict):
            if hook not in self.value:
                raise MisfeatError(f"Ablate has values for {', '.join(self.value)} but not for {hook}")
            return float(self.value[hook])
        return float(self.value)

    def edit(self, act, hook):
        unit = (self.direction / self.direction.norm()).to(act.device, act.dtype)
        coord = act @ unit
        delta = (self.target(hook) - coord)[..., None] * unit
        where = _where(self.positions, act)
        return act + delta if where is None else act + where * delta

    def with_coef(self, coef):
        return dataclasses.replace(self, value=float(coef))

    def describe(self):
        value = self.value if not isinstance(self.value, dict) else dict(self.value)
        return {**super().describe(), "hooks": self.hooks, "value": value}


@dataclass(frozen=True, eq=False)
class ClampLatent(Intervention):
    """Set SAE latent ``latent`` to ``value`` at the SAE's hook, adding back the SAE's
    error term: the activation changes by exactly ``decode(z') - decode(z)``."""

    sae: SAE
    latent: int
    value: float = 0.0
    positions: str = "all"
    op: str = field(default="clamp", init=False)

    def __post_init__(self) -> None:
        _check_positions(self.positions)
        d_sae = int(self.sae.cfg.d_sae)
        if not 0 <= self.latent < d_sae:
            raise MisfeatError(f"latent {self.latent} out of range: the SAE has {d_sae} latents")
        hook_of(self.sae)  # raises when the SAE's metadata names no hook

    @property
    def hook(self) -> str:
        return hook_of(self.sae)

    @property
    def width(self) -> int:
        return int(self.sae.cfg.d_in)

    def hook_names(self, model):
        return check_hooks(model, [self.hook])

    def edit(self, act, hook):
        delta = latent_delta(self.sae, act, self.latent, self.value)
        where = _where(self.positions, act)
        return act + delta if where is None else act + where * delta

    def with_coef(self, coef):
        return dataclasses.replace(self, value=float(coef))

    def describe(self):
        return {**super().describe(), "hook": self.hook, "latent": self.latent, "value": self.value}


@contextlib.contextmanager
def apply(model: HookedTransformer, *interventions: Intervention,
          masks: dict[str, torch.Tensor] | None = None) -> Iterator[HookedTransformer]:
    """Apply ``interventions`` to ``model`` inside the block; every hook is removed on exit,
    also when the block raises. Operators at the same hook run in the order given.

    Position-restricted operators (``positions`` other than ``all``) read the masks of the
    forward in flight: misfeat's own runners (evaluate, generate, the cache) declare them per
    batch; for a plain ``model(batch.tokens)`` inside the block pass ``masks=batch.masks()``."""
    handles = []
    declared = position_masks(masks) if masks is not None else contextlib.nullcontext()
    try:
        for intervention in interventions:
            intervention.check(model)
            for name in intervention.hook_names(model):
                handles.append(model.hook_dict[name].register_forward_hook(_forward_hook(intervention, name)))
        with declared:
            yield model
    finally:
        for handle in handles:
            handle.remove()


def _forward_hook(intervention: Intervention, name: str):
    def hook(module, inputs, output):
        return intervention.edit(output, name)

    return hook
