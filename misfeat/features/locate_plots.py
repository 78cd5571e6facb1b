"""The figures of a locate run: the ranking, the causal screen and the latent families.

Where it sits: :func:`misfeat.features.locate.save_locate` writes them beside summary.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from misfeat.plots import figure


def plot_ranking(increases: list[dict], decreases: list[dict], feature: int, path: Path) -> Path:
    rows = increases + list(reversed(decreases))
    with figure(path, (6.5, 3.8)) as ax:
        colors = ["tab:red" if r["latent"] == feature else ("tab:orange" if r["increase"] > 0 else "tab:blue")
                  for r in rows]
        ax.bar(range(len(rows)), [r["increase"] for r in rows], color=colors)
        ax.set_xticks(range(len(rows)), [str(r["latent"]) for r in rows], rotation=90, fontsize=6)
        ax.axhline(0, color="black", lw=0.5)
        ax.set_ylabel("mean activation: fine-tuned - base")
        ax.set_title(f"SAE latents by change across the fine-tune (chosen: {feature}, red)", fontsize=9)
    return Path(path)


def plot_screen(screen: Any, feature: int, path: Path) -> Path:
    with figure(path, (5, 4)) as ax:
        for r in screen.rows:
            color = "tab:red" if r.latent == feature else ("tab:green" if r.passed else "tab:gray")
            ax.scatter(r.steer_up_misaligned, r.clamp_misaligned, color=color, s=25)
            ax.annotate(str(r.latent), (r.steer_up_misaligned, r.clamp_misaligned), fontsize=6)
        ax.axvline(screen.base_aligned["misaligned_rate"], ls=":", color="black", lw=0.7)
        ax.axhline(screen.base_misaligned["misaligned_rate"], ls=":", color="black", lw=0.7)
        ax.set_xlabel("aligned model, steered up: misaligned rate")
        ax.set_ylabel("misaligned model, latent clamped: misaligned rate")
        ax.set_title("causal screen (green: passed; red: chosen; dotted: unsteered)", fontsize=9)
    return Path(path)


def plot_families(fam: Any, group: list[int], path: Path) -> Path:
    """Decoder cosine matrix and co-activation of the screened latents (group members starred)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [f"{i}*" if i in group else str(i) for i in fam.latents]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5), dpi=120)
    try:
        for ax, mat, title in zip(axes, (fam.decoder_cosine, fam.coactivation),
                                  ("decoder cosine", "co-activation (correlation, misaligned model)"), strict=True):
            im = ax.imshow(np.array(mat), vmin=-1, vmax=1, cmap="RdBu_r")
            ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
            ax.set_yticks(range(len(names)), names, fontsize=6)
            ax.set_title(f"{title}; * = group", fontsize=9)
        fig.colorbar(im, ax=list(axes), shrink=0.8)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    finally:
        plt.close(fig)
    return Path(path)
