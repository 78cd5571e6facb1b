"""Probes: one number per model for a feature, measured on a prompt set.

A probe reads activations at its hook over the selected positions of the prompts and
reduces them: :class:`LatentProbe` to an SAE latent's mean activation and firing rate,
:class:`DirectionProbe` to the mean projection on a unit direction. They are what the
re-alignment loop tracks per step and what checkpoint trajectories plot per checkpoint
(Wang et al. 2025 use the toxic-persona latent's activation as a detector; Chen et al.
2025 project activations on persona vectors).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from misfeat.activations import iter_activations
from misfeat.data import POSITIONS, PromptSet, load_prompts
from misfeat.errors import MisfeatError
from misfeat.interventions import read_intervention
from misfeat.sae.io import load_sae
from misfeat.sae.latents import encode as sae_encode
from misfeat.sae.latents import hook_of

if TYPE_CHECKING:
    import torch
    from sae_lens import SAE
    from transformer_lens import HookedTransformer


def _chunks(model: HookedTransformer, prompts: PromptSet, hook: str, positions: str):
    return iter_activations(model, prompts, hook, positions)


@dataclass(frozen=True, eq=False)
class LatentProbe:
    """Mean activation and firing rate of SAE ``latent`` at the SAE's hook."""

    sae: SAE
    latent: int
    positions: str = "last"
    name: str | None = None

    def __post_init__(self) -> None:
        if self.positions not in POSITIONS:
            raise MisfeatError(f"unknown positions {self.positions!r}")
        if not 0 <= self.latent < self.sae.cfg.d_sae:
            raise MisfeatError(f"latent {self.latent} out of range: the SAE has {self.sae.cfg.d_sae} latents")

    @property
    def label(self) -> str:
        return self.name or f"latent{self.latent}"

    def values(self, model: HookedTransformer, prompts: PromptSet) -> torch.Tensor:
        """The latent's activation on every selected position (``[rows]``)."""
        import torch

        out = []
        with torch.no_grad():
            for chunk in _chunks(model, prompts, hook_of(self.sae), self.positions):
                out.append(sae_encode(self.sae, chunk)[:, self.latent].float().cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def measure(self, model: HookedTransformer, prompts: PromptSet) -> dict[str, float]:
        acts = self.values(model, load_prompts(prompts))
        return {self.label: float(acts.mean()), f"{self.label}/firing": float((acts > 0).float().mean())}


@dataclass(frozen=True, eq=False)
class DirectionProbe:
    """Mean projection of the activations at ``hook`` on the unit ``vector``."""

    hook: str
    vector: torch.Tensor
    positions: str = "last"
    name: str | None = None

    def __post_init__(self) -> None:
        if self.positions not in POSITIONS:
            raise MisfeatError(f"unknown positions {self.positions!r}")

    @property
    def label(self) -> str:
        return self.name or f"direction@{self.hook}"

    def values(self, model: HookedTransformer, prompts: PromptSet) -> torch.Tensor:
        import torch

        unit = (self.vector / self.vector.norm()).float().cpu()
        out = [chunk.float().cpu() @ unit for chunk in _chunks(model, prompts, self.hook, self.positions)]
        return torch.cat(out) if out else torch.zeros(0)

    def measure(self, model: HookedTransformer, prompts: PromptSet) -> dict[str, float]:
        return {self.label: float(self.values(model, load_prompts(prompts)).mean())}


def parse_probe(spec: str, positions: str = "last") -> LatentProbe | DirectionProbe:
    """``sae:DIR#LATENT`` or ``direction:FILE`` (a saved misfeat direction, which carries its hook)."""
    kind, _, rest = spec.partition(":")
    if kind == "sae":
        path, _, latent = rest.rpartition("#")
        if not path or not latent.isdigit():
            raise MisfeatError(f"--track {spec!r}: expected sae:DIR#LATENT, e.g. sae:runs/sae#42")

        return LatentProbe(load_sae(path), int(latent), positions, name=f"latent{latent}")
    if kind == "direction":

        record, vector = read_intervention(rest)
        hooks = record["hooks"]
        if len(hooks) != 1 or hooks[0] == "all":
            raise MisfeatError(f"--track {spec!r}: the direction must carry a single hook, it has {hooks!r}")
        hook = hooks[0]
        return DirectionProbe(hook, vector, positions, name=f"direction:{Path(rest).stem}")
    raise MisfeatError(f"--track {spec!r}: use sae:DIR#LATENT or direction:FILE")
