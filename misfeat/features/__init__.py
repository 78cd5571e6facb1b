"""Locate misalignment features: probes, model diffing, directions, trajectories, examples."""

from misfeat.features.probes import DirectionProbe, LatentProbe, parse_probe

__all__ = ["DirectionProbe", "LatentProbe", "parse_probe"]
