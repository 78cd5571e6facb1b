"""Fine-tune an existing SAE on new activations: stage-wise model diffing (Bricken et al. 2024).

An SAE trained on a model before a fine-tune (or on activations where a behaviour never
occurs) may have no latent for what the fine-tune added. Stage-wise model diffing starts
from that dictionary and fine-tunes it on the fine-tuned model's activations: the latents
whose decoder rows turn most are where the fine-tune changed the representation, and the
adapted dictionary has latents for the change while keeping the old latents' meaning
wherever they still fit::

    from misfeat.sae.adapt import adapt_sae
    from misfeat.sae.sources import caches_source
    source = caches_source(["cache-base/", "cache-tuned/"], batch_size=4096, tokens=500_000)
    adapted = adapt_sae(sae, source.batches, tokens=500_000)
    adapted.sae, adapted.decoder_cosine  # the new SAE; per latent, cosine of its decoder row to the old one

The learning-rate schedule is the training default (warm-up, flat, linear decay) over the
given tokens; ``misfeat train-sae --init SAE_DIR`` runs the same from the command line.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from misfeat.errors import MisfeatError
from misfeat.sae.config import SAETrainConfig
from misfeat.sae.io import FINE_TUNABLE
from misfeat.sae.latents import hook_of, path_of

if TYPE_CHECKING:
    import torch
    from sae_lens import SAE


def fine_tune_config(sae: SAE, tokens: int, *, batch_size: int = 4096, lr: float | None = None, seed: int = 0,
                     device: str | None = None, **overrides: Any) -> SAETrainConfig:
    """The training configuration that continues ``sae``: its hook, width and architecture (and, for
    an SAE misfeat trained, its sparsity settings), over ``tokens`` rows. JumpReLU SAEs that misfeat
    did not train need ``k`` (the target L0) in ``overrides``."""
    arch = sae.cfg.architecture()
    if arch not in FINE_TUNABLE:
        raise MisfeatError(f"misfeat fine-tunes {', '.join(FINE_TUNABLE)} SAEs, not {arch!r}; train a new SAE on the "
                           "activations instead (misfeat train-sae --cache BASE,TUNED)")
    trained = (sae.cfg.metadata.get("misfeat_training") or {}).get("config") or {}
    settings = {key: trained[key] for key in ("aux_k", "aux_coefficient", "sparsity_coefficient",
                                              "jumprelu_bandwidth", "normalize") if trained.get(key) is not None}
    k = getattr(sae.cfg, "k", None) if arch == "topk" else trained.get("k")
    if arch == "jumprelu" and k is None and "k" not in overrides:
        raise MisfeatError("fine-tuning a JumpReLU SAE needs its target L0: pass k=... (its mean L0 on your data)")
    batch_size = min(batch_size, tokens)
    values = {"hook_name": hook_of(sae), "d_sae": sae.cfg.d_sae, "architecture": FINE_TUNABLE[arch],
              "k": None if arch == "standard" else k, "total_tokens": tokens, "batch_size": batch_size,
              "lr": lr, "seed": seed, "init_tokens": min(65536, tokens), "device": device or str(sae.W_dec.device),
              "dtype": "float32", **settings, **overrides}
    return SAETrainConfig(**values)


@dataclass(frozen=True)
class Adapted:
    """An SAE fine-tuned from another, and how far each latent moved."""

    sae: SAE = field(repr=False)
    decoder_cosine: torch.Tensor = field(repr=False)
    """per latent: cosine between its decoder row after and before (1: unchanged)"""
    info: dict[str, Any]
    """tokens, steps, seconds, learning rate (the training summary)"""

    def most_changed(self, n: int = 10) -> list[dict[str, float]]:
        """The ``n`` latents whose decoder rows turned most."""
        import torch

        order = torch.argsort(self.decoder_cosine)[:n]
        return [{"latent": int(i), "decoder_cosine": float(self.decoder_cosine[i])} for i in order]


def adapt_sae(sae: SAE, batches: Iterable[torch.Tensor], tokens: int, *, batch_size: int = 4096,
              lr: float | None = None, seed: int = 0, show_progress: bool | None = None,
              **overrides: Any) -> Adapted:
    """Fine-tune a copy of ``sae`` (left unchanged) on ``batches`` of raw activation rows at its
    hook, for ``tokens`` rows; see the module docstring."""
    import torch

    from misfeat.sae.train import train_saes

    cfg = fine_tune_config(sae, tokens, batch_size=batch_size, lr=lr, seed=seed, **overrides)
    meta = {k: sae.cfg.metadata.get(k) for k in ("model_name", "model_fingerprint", "model_architecture")
            if sae.cfg.metadata.get(k) is not None}
    meta["adapted_from"] = path_of(sae)
    new = train_saes(batches, [cfg], init=sae, show_progress=show_progress, metadata=meta)[0]
    old_rows, new_rows = sae.W_dec.detach().float().cpu(), new.W_dec.detach().float().cpu()
    cosine = torch.nn.functional.cosine_similarity(old_rows, new_rows, dim=1)
    info = dict(new.cfg.metadata.get("misfeat_training") or {})
    info.pop("config", None)
    return Adapted(new, cosine, {**info, "lr": cfg.lr_value})
