"""SAELens-format output: from misfeat's training module to a sae-lens SAE on disk.

The one place that knows the file layout of an SAE run directory::

    DIR/cfg.json, DIR/sae_weights.safetensors   the SAE (SAELens layout; one SAE)
    DIR/<name>/cfg.json ...                     one directory per SAE of a sweep
    DIR/checkpoints/step-000500.pt              resumable training state (latest two kept)
    DIR/metrics.json                            evaluate_sae's metrics
    DIR/summary.json                            the CLI's summary

Folding (Gao et al. 2024 train on inputs scaled by ``s`` so that the mean squared norm is
d_in): the trained SAE maps ``s x`` to ``s x_hat`` with unit-norm decoder rows. Dividing
the biases (``b_enc``, ``b_dec``) and thresholds by ``s`` gives an SAE that maps raw
``x`` to raw ``x_hat``: every pre-activation is divided by ``s > 0``, which changes
neither the TopK selection nor any ReLU / JumpReLU gate, and the decoder rows stay unit
norm. Its latent values are then in raw activation units (the length of the latent's
contribution along its unit decoder direction).
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from misfeat.errors import MisfeatError
from misfeat.io import METRICS_FILE, SUMMARY_FILE
from misfeat.sae.latents import set_path

if TYPE_CHECKING:
    import torch
    from sae_lens import SAE

    from misfeat.sae.config import SAETrainConfig
    from misfeat.sae.model import SparseAutoencoder

logger = logging.getLogger(__name__)

SAE_CFG_FILE = "cfg.json"  # sae_lens.constants.SAE_CFG_FILENAME
SAE_WEIGHTS_FILE = "sae_weights.safetensors"  # sae_lens.constants.SAE_WEIGHTS_FILENAME
CHECKPOINT_DIR = "checkpoints"
KEEP_CHECKPOINTS = 2


class SAEFileError(MisfeatError):
    """An SAE directory or checkpoint is missing or unreadable."""


@dataclass(frozen=True)
class RunPaths:
    """File names of an SAE training run rooted at ``root``."""

    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINT_DIR

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step-{step:07d}.pt"

    @property
    def summary(self) -> Path:
        return self.root / SUMMARY_FILE

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_FILE

    def sae_dir(self, cfgs: list[SAETrainConfig], index: int) -> Path:
        """Where SAE ``index`` of ``cfgs`` is saved: the root for one SAE, a subdirectory per SAE of a sweep."""
        if len(cfgs) == 1:
            return self.root
        names = [c.describe() for c in cfgs]
        name = names[index]
        if names.count(name) > 1:
            name = f"{name}-{index}"
        return self.root / name

    def list_checkpoints(self) -> list[Path]:
        if not self.checkpoints.is_dir():
            return []
        return sorted(p for p in self.checkpoints.glob("step-*.pt") if p.name[5:-3].isdigit())


# --- misfeat module -> sae-lens SAE ---------------------------------------------------


def to_sae_lens(module: SparseAutoencoder, scale: float, metadata: dict[str, Any] | None = None) -> SAE:
    """The sae-lens inference SAE equal to ``module`` on raw (unscaled) activations.

    topk -> ``TopKSAE`` (ReLU after the top-k, no decoder-norm rescaling, as trained);
    relu -> ``StandardSAE``; jumprelu -> ``JumpReLUSAE``; batchtopk -> ``JumpReLUSAE``
    with every threshold at the learned BatchTopK threshold (as sae-lens saves it).
    The scale ``s`` is folded in (see the module docstring); ``normalize_activations``
    is ``none``, so the saved SAE takes raw activations.
    """
    import torch
    from sae_lens import (
        JumpReLUSAE,
        JumpReLUSAEConfig,
        StandardSAE,
        StandardSAEConfig,
        TopKSAE,
        TopKSAEConfig,
    )
    from sae_lens.saes.sae import SAEMetadata

    cfg = module.cfg
    meta = SAEMetadata(hook_name=cfg.hook_name, **(metadata or {}))
    common = dict(d_in=module.d_in, d_sae=module.d_sae, dtype=cfg.dtype,
                  device=str(module.W_enc.device), apply_b_dec_to_input=True, normalize_activations="none",
                  metadata=meta)
    with torch.no_grad():
        state = {
            "W_enc": module.W_enc.t().contiguous().clone(),
            "W_dec": module.W_dec.contiguous().clone(),
            "b_enc": module.b_enc / scale,
            "b_dec": module.b_dec / scale,
        }
        if cfg.architecture == "topk":
            sae = TopKSAE(TopKSAEConfig(k=int(cfg.k_value), rescale_acts_by_decoder_norm=False, **common))
        elif cfg.architecture == "relu":
            sae = StandardSAE(StandardSAEConfig(**common))
        else:
            sae = JumpReLUSAE(JumpReLUSAEConfig(**common))
            threshold = module.threshold if cfg.architecture == "jumprelu" else (
                torch.full_like(module.b_enc, float(module.topk_threshold)))
            state["threshold"] = threshold / scale
        sae.load_state_dict({k: v.detach().to(module.W_enc.dtype) for k, v in state.items()})
    sae.eval()
    return sae


# --- saving and loading ----------------------------------------------------------------


FINE_TUNABLE = {"topk": "topk", "standard": "relu", "jumprelu": "jumprelu"}
"""sae-lens architectures misfeat can fine-tune, and the training architecture each becomes"""


def load_sae_lens_into(module: SparseAutoencoder, sae: SAE, scale: float) -> None:
    """Set ``module``'s weights (normalised space, inputs x ``scale``) to those of the sae-lens inference
    ``sae`` (raw activations): the inverse of :func:`to_sae_lens`, so that fine-tuning starts from ``sae``.

    Decoder rows that are not unit norm are made so with their norms moved into the encoder (and the
    thresholds), which leaves a ReLU or JumpReLU SAE's output unchanged; a TopK SAE's selection would
    change, so it must have unit-norm rows. An SAE that normalises its inputs itself is refused."""
    import torch

    cfg, arch = sae.cfg, sae.cfg.architecture()
    if FINE_TUNABLE.get(arch) != module.cfg.architecture:
        raise MisfeatError(f"cannot start a {module.cfg.architecture} SAE from a sae-lens {arch!r} SAE; misfeat "
                           f"fine-tunes {', '.join(FINE_TUNABLE)} SAEs")
    if (cfg.d_in, cfg.d_sae) != (module.d_in, module.d_sae):
        raise MisfeatError(f"the SAE is {cfg.d_in} -> {cfg.d_sae}; the SAE to fine-tune is {module.d_in} -> "
                           f"{module.d_sae}")
    if cfg.normalize_activations != "none":
        raise MisfeatError(f"the SAE normalises its inputs itself (normalize_activations="
                           f"{cfg.normalize_activations!r}); misfeat fine-tunes SAEs that take raw activations")
    with torch.no_grad():
        W_enc = sae.W_enc.detach().double()  # [d_in, d_sae]
        W_dec, b_enc, b_dec = (t.detach().double() for t in (sae.W_dec, sae.b_enc, sae.b_dec))
        if not getattr(cfg, "apply_b_dec_to_input", True):  # x W + b = (x - b_dec) W + (b + b_dec W)
            b_enc = b_enc + b_dec @ W_enc
        norms = W_dec.norm(dim=1)
        if arch == "topk" and (getattr(cfg, "rescale_acts_by_decoder_norm", False)
                               or bool((norms - 1).abs().max() > 1e-4)):
            raise MisfeatError("this TopK SAE's decoder rows are not unit norm (or it rescales by their norms); "
                               "misfeat fine-tunes TopK SAEs with unit-norm rows, as it trains them")
        W_dec, W_enc, b_enc = W_dec / norms[:, None], W_enc * norms, b_enc * norms
        state = {"W_enc": W_enc.t(), "W_dec": W_dec, "b_enc": b_enc * scale, "b_dec": b_dec * scale}
        if arch == "jumprelu":
            state["threshold"] = sae.threshold.detach().double() * norms * scale
        for name, value in state.items():
            getattr(module, name).copy_(value.to(getattr(module, name)))


def save_sae(sae: SAE, out_dir: str | os.PathLike) -> Path:
    """Write ``sae`` in the SAELens layout (``cfg.json`` + ``sae_weights.safetensors``).

    The files are written to a temporary directory beside ``out_dir`` and moved in, so
    a crash never leaves a half-written SAE; other files in ``out_dir`` are kept.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".sae-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    set_path(sae, None)  # the directory is where it is read from, not a saved setting
    sae.save_model(tmp)
    for name in (SAE_WEIGHTS_FILE, SAE_CFG_FILE):
        os.replace(tmp / name, out / name)
    shutil.rmtree(tmp, ignore_errors=True)
    set_path(sae, str(out))
    return out


def load_sae(path: str | os.PathLike, device: str | None = None, dtype: str | None = None) -> SAE:
    """Load an SAELens-layout SAE directory (misfeat's or anyone's) with ``sae_lens.SAE.load_from_disk``,
    in eval mode, its directory kept in its metadata (:func:`misfeat.sae.latents.path_of`), so that
    interventions on its latents can be saved and reloaded. The one SAE loader of misfeat."""
    from sae_lens import SAE

    path = Path(path)
    missing = [name for name in (SAE_CFG_FILE, SAE_WEIGHTS_FILE) if not (path / name).is_file()]
    if missing:
        raise SAEFileError(f"{path} is not an SAE directory (missing {', '.join(missing)}); pass the directory "
                           "written by `misfeat train-sae --out DIR` or sae_lens's save_model")
    try:
        sae = SAE.load_from_disk(str(path), device=device or "cpu", dtype=dtype)
    except Exception as err:  # sae-lens raises many error types for a bad cfg.json or weights file
        raise SAEFileError(f"cannot load the SAE in {path}: {err}") from err
    return set_path(sae.eval(), str(path))


# --- checkpoints -------------------------------------------------------------------------


def write_checkpoint(paths: RunPaths, step: int, state: dict[str, Any]) -> Path:
    """Save ``state`` as the checkpoint of ``step`` (temporary file + rename); keep the latest two."""
    import torch

    path = paths.checkpoint(step)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    for old in paths.list_checkpoints()[:-KEEP_CHECKPOINTS]:
        old.unlink(missing_ok=True)
    logger.info("checkpoint %s", path)
    return path


def read_latest_checkpoint(paths: RunPaths, map_location: torch.device | str = "cpu") -> tuple[Path, dict] | None:
    """The newest readable checkpoint of a run, or None when there is none."""
    import torch

    for path in reversed(paths.list_checkpoints()):
        try:
            return path, torch.load(path, map_location=map_location, weights_only=True)
        except (OSError, RuntimeError, EOFError) as err:
            logger.warning("skipping unreadable checkpoint %s: %s", path, err)
    return None
