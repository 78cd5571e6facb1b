"""Saved interventions: one record schema, the one vector reader, and loading back.

A saved intervention is ``PATH.safetensors`` (the vector, with the record in its metadata)
plus the same record as human-readable ``PATH.json``. The record (``version`` 2)::

    format     "misfeat-intervention"
    version    2
    op         "add" | "ablate" | "clamp"
    hooks      list of hook names; ["all"] = the residual stream of every layer
    layers     the blocks of ``hooks`` ("all" for every layer)
    positions  "all" | "prompt" | "response" | "last"
    scale      add: the vector is added ``scale`` times (None for the other ops)
    coordinate ablate: the coordinate along the unit direction is set to this (a number, or
               one per hook; None projects the direction out)
    activation clamp: the SAE latent is set to this value
    width      the vector's length; norm: its L2 norm (add/ablate)
    source     where it came from: {"kind": "sae", "path", "latent"}, {"kind": "direction", ...}

Version-1 files (``hook`` or ``hooks`` as a string, ``value`` for both ablate and clamp)
still load: :func:`read_intervention` returns every record in the version-2 schema.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from misfeat.errors import MisfeatError
from misfeat.hooks import block_of
from misfeat.interventions.operators import OPS, Ablate, Add, ClampLatent, Intervention
from misfeat.sae.io import load_sae
from misfeat.sae.latents import path_of

if TYPE_CHECKING:
    import torch
    from transformer_lens import HookedTransformer

FORMAT = "misfeat-intervention"
RECORD_VERSION = 2


def to_record(intervention: Intervention) -> dict[str, Any]:
    """The version-2 record of ``intervention`` (without its source)."""
    if isinstance(intervention, Add):
        hooks, strength = intervention.hook, {"scale": float(intervention.scale)}
    elif isinstance(intervention, Ablate):
        hooks, strength = intervention.hooks, {"coordinate": intervention.value}
    elif isinstance(intervention, ClampLatent):
        hooks, strength = intervention.hook, {"activation": float(intervention.value), "latent": intervention.latent}
    else:
        raise MisfeatError(f"cannot save a {type(intervention).__name__}; save Add, Ablate or ClampLatent")
    hooks = [hooks] if isinstance(hooks, str) else list(hooks)
    return {"format": FORMAT, "version": RECORD_VERSION, "op": intervention.op, "hooks": hooks,
            "layers": "all" if hooks == ["all"] else [block_of(h) for h in hooks],
            "positions": intervention.positions, **strength, "width": intervention.width}


def upgrade_record(record: dict[str, Any], where: str = "<record>") -> dict[str, Any]:
    """A record of any version in the version-2 schema (see the module docstring)."""
    if record.get("format") != FORMAT:
        raise MisfeatError(f"{where}: unknown format {record.get('format')!r}")
    version = record.get("version", 1)
    if version == RECORD_VERSION:
        return record
    if version != 1:
        raise MisfeatError(f"{where}: intervention record version {version} is newer than this misfeat "
                           f"(reads up to {RECORD_VERSION}); upgrade misfeat")
    out = {k: v for k, v in record.items() if k not in ("hook", "value")}
    hooks = record.get("hook", record.get("hooks"))
    out["hooks"] = [hooks] if isinstance(hooks, str) else list(hooks)
    if record["op"] == "ablate":
        out["coordinate"] = record.get("value")
    elif record["op"] == "clamp":
        out["activation"] = record.get("value", 0.0)
    out["version"] = RECORD_VERSION
    return out


def single_hook(record: dict[str, Any], where: str) -> str:
    """The one hook of a record (a direction lives at one hook)."""
    hooks = record["hooks"]
    if len(hooks) != 1 or hooks[0] == "all":
        raise MisfeatError(f"{where} holds an intervention on {hooks!r}, not a single-hook direction")
    return hooks[0]


def save_intervention(intervention: Intervention, path: str | os.PathLike, *,
                      source: dict[str, Any] | None = None) -> Path:
    """Save ``intervention`` as ``PATH.safetensors`` + ``PATH.json`` (the record of the module
    docstring). A :class:`ClampLatent` needs its SAE's directory (an SAE from ``load_sae``)."""
    import torch
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix in (".safetensors", ".json"):
        path = path.with_suffix("")
    path.parent.mkdir(parents=True, exist_ok=True)
    record = to_record(intervention)
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
    tmp = path.with_name(path.name + ".safetensors.tmp")
    save_file(tensors, str(tmp), metadata={"misfeat": json.dumps(record)})
    os.replace(tmp, path.with_suffix(".safetensors"))
    path.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    return path.with_suffix(".safetensors")


def read_intervention(path: str | os.PathLike) -> tuple[dict[str, Any], torch.Tensor]:
    """``(record, vector)`` of a saved intervention (``.safetensors``, ``.json`` or stem); the
    record in the version-2 schema, whatever version the file was written with."""
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
    return upgrade_record(json.loads(meta["misfeat"]), str(file)), vector


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
            hooks = record["hooks"]
            return vector.float(), hook or (hooks[0] if len(hooks) == 1 else hooks), source
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
        raise MisfeatError(f"{path} is a raw vector with no hook: pass --hook (hook= in Python), "
                           "e.g. blocks.1.hook_resid_post")
    return vector.float(), hook, source


def load_intervention(path: str | os.PathLike, model: HookedTransformer | None = None, *,
                      op: str | None = None) -> Intervention:
    """Rebuild a saved intervention (optionally as another ``op`` on the same site) and, given
    a ``model``, check it fits: same width and every hook present."""
    record, vector = read_intervention(path)
    op = op or record["op"]
    if op not in OPS:
        raise MisfeatError(f"unknown op {op!r}; use one of {', '.join(OPS)}")
    hooks = record["hooks"]
    site = "all" if hooks == ["all"] else (hooks[0] if len(hooks) == 1 else hooks)
    positions = record.get("positions", "all")
    if op == "clamp" or record["op"] == "clamp":
        source = record.get("source", {})
        if source.get("kind") != "sae":
            raise MisfeatError(f"{path}: a clamp needs an SAE latent as source, this has {source.get('kind')!r}")
        sae = load_sae(source["path"])
        value = record.get("activation", 0.0) if record["op"] == "clamp" else 0.0
        intervention: Intervention = ClampLatent(sae, int(source["latent"]), value, positions)
    elif op == "add":
        intervention = Add(site, vector, record.get("scale", 1.0), positions)
    else:
        intervention = Ablate(site, vector, record.get("coordinate"), positions)
    if model is not None:
        if model.cfg.d_model != vector.shape[-1] and "resid" in str(hooks):
            raise MisfeatError(f"{path} holds a {vector.shape[-1]}-dim vector for {hooks}, but this model has "
                               f"d_model {model.cfg.d_model}: it was made for another model")
        intervention.hook_names(model)  # raises listing valid hooks when one is missing
        intervention.check(model)
    return intervention
