"""Sparse autoencoders on cached or live activations: train, evaluate, save in SAELens format.

Stage three of the flow (model + prompts -> activations -> **SAE** -> features): train
TopK (default), BatchTopK, ReLU or JumpReLU SAEs on any ``Iterator[Tensor]`` of
activation batches, with a sparse TopK kernel, AuxK, checkpoints and resume, sweeps
from one read of the data and data-parallel runs under torchrun; the result is a
sae-lens SAE (``cfg.json`` + ``sae_weights.safetensors``) that loads with
``sae_lens.SAE.load_from_disk`` and splices into ``HookedSAETransformer``.

    from misfeat.activations import open_store
    from misfeat.sae import SAETrainConfig, train_sae, evaluate_sae

    store = open_store("cache/")
    cfg = SAETrainConfig(hook_name="blocks.1.hook_resid_post", d_sae=1024, k=16)
    sae = train_sae(store.batches(cfg.hook_name, cfg.batch_size, epochs=10), cfg, out_dir="sae/")
    metrics = evaluate_sae(sae, store, model=model, out_dir="sae/")
    adapted = adapt_sae(sae, tuned_store.batches(cfg.hook_name, 4096, epochs=2), tokens=500_000)  # stage-wise diffing

The SAE seam: :func:`load_sae` is the one loader (the directory kept in the SAE's metadata),
:func:`hook_of` / :func:`path_of` read its metadata, :func:`encode` / :func:`decode` handle
dtype and device; ``features/``, the interventions and the steering use these.

Only this package's submodules import torch and sae-lens; ``import misfeat.sae`` is light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from misfeat.sae.config import ARCHITECTURES, SAEConfigError, SAETrainConfig

if TYPE_CHECKING:
    from misfeat.sae.adapt import Adapted, adapt_sae
    from misfeat.sae.io import load_sae, save_sae, to_sae_lens
    from misfeat.sae.latents import decode, encode, hook_of, path_of
    from misfeat.sae.metrics import SAEMetrics, evaluate_sae
    from misfeat.sae.train import train_sae, train_saes

__all__ = ["ARCHITECTURES", "Adapted", "SAEConfigError", "SAEMetrics", "SAETrainConfig", "adapt_sae", "decode", "encode",
           "evaluate_sae", "hook_of", "load_sae", "path_of", "save_sae", "to_sae_lens", "train_sae", "train_saes"]

_LAZY = {
    "train_sae": "misfeat.sae.train", "train_saes": "misfeat.sae.train",
    "evaluate_sae": "misfeat.sae.metrics", "SAEMetrics": "misfeat.sae.metrics",
    "load_sae": "misfeat.sae.io", "save_sae": "misfeat.sae.io", "to_sae_lens": "misfeat.sae.io",
    "hook_of": "misfeat.sae.latents", "path_of": "misfeat.sae.latents", "encode": "misfeat.sae.latents",
    "decode": "misfeat.sae.latents", "adapt_sae": "misfeat.sae.adapt", "Adapted": "misfeat.sae.adapt",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'misfeat.sae' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
