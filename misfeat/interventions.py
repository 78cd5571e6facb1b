"""Steer, ablate and clamp: one operator signature for every intervention on a model.

Each operator maps an activation at one or more hooks to a new one, restricted to a
set of positions (``all``, ``prompt``, ``response``, ``last``: the last prompt token).
Operators are applied as context managers that remove their hooks on exit, errors
included, and compose (several operators, several layers at once)::

    with apply(model, Add("blocks.1.hook_resid_post", v, scale=4.0, positions="last")):
        report = evaluate(model, "organism:heldout")

- :class:`Add`: add ``scale * vector`` (steering; Turner et al. 2023, Soligo et al. 2025).
- :class:`Ablate`: project a direction out (``value=None``; Soligo et al. 2025 ablate the
  mean-diff direction from every layer), or set the coordinate along it to ``value``
  (e.g. the aligned model's mean coordinate).
- :class:`ClampLatent`: set an SAE latent to ``value`` and keep the SAE's error term, so
  nothing but that latent's contribution changes (Wang et al. 2025 steer persona latents).

Positions are read from :func:`misfeat.hooks.position_masks`, which the evaluation, the
sweeps and :func:`misfeat.generate.generate` declare for every forward they run, so
``positions`` means the same in scoring and in KV-cached generation (new tokens are
response tokens). Saved interventions (:func:`save_intervention`) carry their site.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from misfeat.data import POSITIONS
from misfeat.errors import MisfeatError
from misfeat.hooks import block_of, check_hooks, mask_for, position_masks
from misfeat.sae.io import load_sae
from misfeat.sae.latents import hook_of, latent_delta, path_of

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


# --- saved interventions --------------------------------------------------------------

FORMAT = "misfeat-intervention"


def save_intervention(intervention: Intervention, path: str | os.PathLike, *,
                      source: dict[str, Any] | None = None) -> Path:
    """Save ``intervention`` as ``PATH.safetensors`` (the vector, with the record in its
    metadata) plus a human-readable ``PATH.json``: op, site (hooks, layers), positions,
    scale/value, width and source (an SAE latent, or where the direction came from)."""
    import torch
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix in (".safetensors", ".json"):
        path = path.with_suffix("")
    path.parent.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"format": FORMAT, "version": 1, **intervention.describe(), "width": intervention.width}
    hooks = record.get("hook", record.get("hooks"))
    names = [hooks] if isinstance(hooks, str) else list(hooks)
    record["layers"] = [block_of(h) for h in names] if names != ["all"] else "all"
    if isinstance(intervention, ClampLatent):
        record["source"] = source or {"kind": "sae", "latent": intervention.latent,
                                      "path": path_of(intervention.sae)}
        if record["source"].get("path") is None:
            raise MisfeatError("to save a ClampLatent, give source={'kind': 'sae', 'path': <SAE dir>, 'latent': i}")
        tensors = {"vector": intervention.sae.W_dec[intervention.latent].detach().float().cpu().contiguous()}
    else:
        vector = intervention.vector if isinstance(intervention, Add) else intervention.direction
        record["source"] = source or {"kind": "vector"}
        record["norm"] = float(vector.float().norm())
        tensors = {"vector": vector.detach().to(torch.float32).cpu().contiguous()}
    text = json.dumps(record, indent=2)
    tmp = path.with_name(path.name + ".safetensors.tmp")
    save_file(tensors, str(tmp), metadata={"misfeat": json.dumps(record)})
    os.replace(tmp, path.with_suffix(".safetensors"))
    path.with_suffix(".json").write_text(text + "\n")
    return path.with_suffix(".safetensors")


def read_intervention(path: str | os.PathLike) -> tuple[dict[str, Any], torch.Tensor]:
    """``(record, vector)`` of a saved intervention (``.safetensors``, ``.json`` or stem)."""
    from safetensors import safe_open

    path = Path(path)
    file = path if path.suffix == ".safetensors" else path.with_suffix(".safetensors")
    if not file.is_file():
        raise MisfeatError(f"no saved intervention at {file}")
    try:
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
            vector = f.get_tensor("vector")
    except Exception as err:  # safetensors raises its own error types
        raise MisfeatError(f"cannot read {file}: {err}") from err
    if "misfeat" not in meta:
        raise MisfeatError(f"{file} is a safetensors file but not a saved misfeat intervention or direction")
    record = json.loads(meta["misfeat"])
    if record.get("format") != FORMAT:
        raise MisfeatError(f"{file}: unknown format {record.get('format')!r}")
    return record, vector


def read_vector(path: str | os.PathLike, hook: str | None = None) -> tuple[torch.Tensor, str, dict[str, Any]]:
    """``(vector, hook, source)`` from a vector file: a saved misfeat direction or intervention
    (which carries its hook; ``hook`` overrides it), or a raw 1-D vector in ``.safetensors``
    (one tensor), ``.pt``/``.pth`` or ``.npy``, which needs ``hook``. The one vector reader."""
    import torch

    p = Path(path)
    source = {"kind": "direction", "path": str(p)}
    if not p.exists() and not p.with_suffix(".safetensors").exists():
        raise MisfeatError(f"{path}: no such vector file")
    if p.suffix in (".safetensors", ".json", ""):
        try:
            record, vector = read_intervention(p)
            return vector.float(), hook or record.get("hook") or record.get("hooks"), source
        except MisfeatError as err:
            if "not a saved misfeat" not in str(err):
                raise
        from safetensors.torch import load_file

        tensors = load_file(str(p))
        if len(tensors) != 1:
            raise MisfeatError(f"{path} holds {len(tensors)} tensors; a raw vector file holds one")
        vector = next(iter(tensors.values()))
    elif p.suffix == ".npy":
        import numpy as np

        vector = torch.from_numpy(np.load(p))
    elif p.suffix in (".pt", ".pth"):
        vector = torch.load(p, map_location="cpu", weights_only=True)
    else:
        raise MisfeatError(f"{path}: use a .safetensors (saved by misfeat, or one tensor), .pt or .npy file")
    if not isinstance(vector, torch.Tensor) or vector.dim() != 1:
        raise MisfeatError(f"{path} must hold one 1-D vector, found shape {getattr(vector, 'shape', None)}")
    if hook is None:
        raise MisfeatError(f"{path} is a raw vector with no hook: pass --hook (hook= in Python), e.g. blocks.1.hook_resid_post")
    return vector.float(), hook, source


def load_intervention(path: str | os.PathLike, model: HookedTransformer | None = None, *,
                      op: str | None = None) -> Intervention:
    """Rebuild a saved intervention (optionally as another ``op`` on the same site) and, given
    a ``model``, check it fits: same width and every hook present."""
    record, vector = read_intervention(path)
    op = op or record["op"]
    if op not in OPS:
        raise MisfeatError(f"unknown op {op!r}; use one of {', '.join(OPS)}")
    hooks = record.get("hook", record.get("hooks"))
    positions = record.get("positions", "all")
    if op == "clamp" or record["op"] == "clamp":
        source = record.get("source", {})
        if source.get("kind") != "sae":
            raise MisfeatError(f"{path}: a clamp needs an SAE latent as source, this has {source.get('kind')!r}")
        sae = load_sae(source["path"])
        value = record.get("value", 0.0) if record["op"] == "clamp" else 0.0
        intervention: Intervention = ClampLatent(sae, int(source["latent"]), value, positions)
    elif op == "add":
        intervention = Add(hooks, vector, record.get("scale", 1.0), positions)
    else:
        intervention = Ablate(hooks, vector, record.get("value"), positions)
    if model is not None:
        if model.cfg.d_model != vector.shape[-1] and "resid" in str(hooks):
            raise MisfeatError(f"{path} holds a {vector.shape[-1]}-dim vector for {hooks}, but this model has "
                               f"d_model {model.cfg.d_model}: it was made for another model")
        intervention.hook_names(model)  # raises listing valid hooks when one is missing
        intervention.check(model)
    return intervention
