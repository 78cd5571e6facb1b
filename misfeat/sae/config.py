"""What to train: the frozen configuration of one sparse autoencoder run.

A :class:`SAETrainConfig` says which SAE to train (architecture, width, sparsity) and how
(tokens, batch, learning-rate schedule, dead-latent loss). It is read, never mutated, by
:mod:`misfeat.sae.train`. Several configs can be trained from one read of the data
(:func:`misfeat.sae.train_saes`) when they agree on the fields in :data:`SHARED_FIELDS`,
the ones that describe the data stream rather than the SAE.

Defaults follow Gao et al. 2024, "Scaling and evaluating sparse autoencoders" (TopK, AuxK
with k_aux = d_in / 2, learning rate proportional to 1 / sqrt(d_sae), inputs scaled to a
mean squared norm of d_in), with the linear warm-up and final linear decay of Conerly et
al. 2024 ("Circuits Updates, April 2024"). The base learning rate and the AuxK weight are
higher than Gao et al.'s, as measured on short runs (docs/benchmarks.md).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from misfeat.errors import MisfeatError

ARCHITECTURES = ("topk", "batchtopk", "relu", "jumprelu")
#: architectures trained with the AuxK dead-latent loss (Gao et al. 2024, sec. A.2)
AUXK_ARCHITECTURES = ("topk", "batchtopk", "jumprelu")
KERNELS = ("auto", "sparse", "dense")
DTYPES = ("float32", "float64")

#: fields every config of a sweep must share: they describe the data stream and the run
SHARED_FIELDS = ("hook_name", "total_tokens", "batch_size", "normalize", "init_tokens",
                 "checkpoint_every", "log_every", "device", "dtype")

_DEFAULT_K = 32
_DEFAULT_SPARSITY = {"relu": 1e-2, "jumprelu": 3e-3}


class SAEConfigError(MisfeatError):
    """An SAE training configuration is invalid; the message names the field and the fix."""


@dataclass(frozen=True)
class SAETrainConfig:
    """One SAE to train. Every field's docstring doubles as its ``--help`` text.

    Attributes:
        hook_name: TransformerLens hook the activations come from (``blocks.1.hook_resid_post``);
            saved in the SAE's metadata so ``HookedSAETransformer.add_sae`` splices it there.
        d_sae: number of latents (dictionary size), e.g. 8 x d_model.
        architecture: ``topk`` (default; Gao et al. 2024), ``batchtopk`` (Bussmann et al. 2024,
            saved as a JumpReLU SAE), ``relu`` (L1-penalised, Bricken et al. 2023) or
            ``jumprelu`` (Rajamanoharan et al. 2024, L0 penalty around a target).
        k: active latents per token: exact for topk, on average over the batch for batchtopk,
            the target L0 of jumprelu's penalty. Not used by relu (leave it None). Default 32.
        total_tokens: activation rows to train on; training also stops if the data runs out.
        batch_size: rows per optimiser step (across all processes when data-parallel).
        lr: Adam learning rate; default 2e-3 / sqrt(d_sae / 16384): Gao et al.'s scaling with
            d_sae (2024, sec. 2.3) at 10x their base rate, which short runs need with unit-norm
            decoder rows (docs/benchmarks.md has the sweep).
        lr_warmup_steps: linear warm-up from 0; default 5% of the steps, at most 1000.
        lr_decay_fraction: the final fraction of the steps over which the rate decays
            linearly to 0 (Conerly et al. 2024 use 0.2).
        adam_betas: Adam's (beta1, beta2).
        aux_k: latents in the AuxK dead-latent loss (topk, batchtopk, jumprelu); default d_in // 2.
        aux_coefficient: weight of the AuxK loss; 0 disables it. Gao et al. 2024 use 1/32; the
            default 1.0 (sae-lens's) left fewer dead latents here at no cost in explained
            variance (docs/benchmarks.md).
        dead_tokens: a latent that has not fired for this many tokens counts as dead for
            the AuxK loss and the live dead fraction; default min(10M, total_tokens / 10).
        sparsity_coefficient: relu: weight of the L1 penalty; jumprelu: weight of the
            quadratic L0 penalty around ``k`` (Gemma Scope 2). Default 1e-2 (relu: L0 about 25
            on the organism) and 3e-3 (jumprelu).
        jumprelu_bandwidth: width of the straight-through estimator's window (jumprelu).
        normalize: scale inputs so their mean squared norm is d_in during training; the
            scale is folded into the saved weights, which take raw activations.
        init_tokens: rows read first to estimate the scale, the mean that initialises
            b_dec, and the variance the loss is normalised by (they are trained on too).
        kernel: ``sparse`` (TopK/BatchTopK backward touching only the selected latents),
            ``dense`` (plain reference computation) or ``auto`` (sparse where it applies).
        checkpoint_every: save a resumable checkpoint every this many steps (0: never).
        log_every: refresh the progress bar's L0 / explained variance / dead fraction
            every this many steps.
        seed: seed of the weight initialisation.
        device: ``cpu``, ``cuda``, ``cuda:1`` ...; default cuda when available.
        dtype: parameter and compute dtype: float32 (default) or float64.
    """

    hook_name: str
    d_sae: int
    architecture: str = "topk"
    k: float | None = None
    total_tokens: int = 2_000_000
    batch_size: int = 4096
    lr: float | None = None
    lr_warmup_steps: int | None = None
    lr_decay_fraction: float = 0.2
    adam_betas: tuple[float, float] = (0.9, 0.999)
    aux_k: int | None = None
    aux_coefficient: float = 1.0
    dead_tokens: int | None = None
    sparsity_coefficient: float | None = None
    jumprelu_bandwidth: float = 0.05
    normalize: bool = True
    init_tokens: int = 65_536
    kernel: str = "auto"
    checkpoint_every: int = 0
    log_every: int = 10
    seed: int = 0
    device: str | None = None
    dtype: str = "float32"

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> SAEConfigError:
            return SAEConfigError(f"SAE config: {field}={getattr(self, field)!r} {why}")

        if not isinstance(self.hook_name, str) or not self.hook_name:
            raise bad("hook_name", "must name the hook the activations come from, e.g. blocks.1.hook_resid_post")
        if self.architecture not in ARCHITECTURES:
            raise bad("architecture", f"is unknown; use one of {', '.join(ARCHITECTURES)}")
        if self.kernel not in KERNELS:
            raise bad("kernel", f"is unknown; use one of {', '.join(KERNELS)}")
        if self.dtype not in DTYPES:
            raise bad("dtype", "is not supported for training; train in float32 and cast the saved SAE "
                      "(sae_lens.SAE.load_from_disk(dir, dtype='bfloat16'))")
        for name in ("d_sae", "total_tokens", "batch_size", "init_tokens", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise bad(name, "must be a positive integer")
        if self.batch_size > self.total_tokens:
            raise bad("batch_size", f"is larger than total_tokens={self.total_tokens}")
        if self.architecture == "relu":
            if self.k is not None:
                raise bad("k", "has no meaning for a relu SAE (its L1 penalty sets the sparsity); leave it "
                          "unset and tune sparsity_coefficient, or use architecture='topk'")
        elif self.k is not None:
            if not (self.k > 0 and self.k <= self.d_sae):
                raise bad("k", f"must be in (0, d_sae={self.d_sae}]")
            if self.architecture == "topk" and float(self.k) != int(self.k):
                raise bad("k", "must be a whole number for a topk SAE")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise bad("lr", "must be a positive number")
        if self.lr_warmup_steps is not None and self.lr_warmup_steps < 0:
            raise bad("lr_warmup_steps", "must be >= 0")
        if not 0 <= self.lr_decay_fraction <= 1:
            raise bad("lr_decay_fraction", "must be between 0 and 1")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise bad("adam_betas", "must be two numbers in [0, 1)")
        if self.aux_k is not None and self.aux_k <= 0:
            raise bad("aux_k", "must be a positive integer")
        if self.aux_coefficient < 0:
            raise bad("aux_coefficient", "must be >= 0")
        if self.dead_tokens is not None and self.dead_tokens <= 0:
            raise bad("dead_tokens", "must be a positive integer")
        if self.sparsity_coefficient is not None and self.sparsity_coefficient < 0:
            raise bad("sparsity_coefficient", "must be >= 0")
        if self.jumprelu_bandwidth <= 0:
            raise bad("jumprelu_bandwidth", "must be > 0")
        if self.checkpoint_every < 0:
            raise bad("checkpoint_every", "must be >= 0 (0: no checkpoints)")

    # --- resolved defaults (derived, never stored) ------------------------------------

    @property
    def n_steps(self) -> int:
        """Optimiser steps: ``total_tokens // batch_size``."""
        return self.total_tokens // self.batch_size

    @property
    def k_value(self) -> float:
        """``k`` with its default (32) filled in; 0 for relu."""
        if self.architecture == "relu":
            return 0.0
        return float(self.k if self.k is not None else _DEFAULT_K)

    @property
    def lr_value(self) -> float:
        return self.lr if self.lr is not None else 2e-3 / math.sqrt(self.d_sae / 2**14)

    @property
    def warmup_steps(self) -> int:
        if self.lr_warmup_steps is not None:
            return self.lr_warmup_steps
        return min(1000, self.n_steps // 20)

    @property
    def dead_tokens_value(self) -> int:
        if self.dead_tokens is not None:
            return self.dead_tokens
        return max(self.batch_size, min(10_000_000, self.total_tokens // 10))

    @property
    def sparsity_value(self) -> float:
        if self.sparsity_coefficient is not None:
            return self.sparsity_coefficient
        return _DEFAULT_SPARSITY.get(self.architecture, 0.0)

    def aux_k_value(self, d_in: int) -> int:
        return min(self.aux_k if self.aux_k is not None else max(1, d_in // 2), self.d_sae)

    def lr_at(self, step: int) -> float:
        """The learning rate of optimiser step ``step`` (0-based): warm-up, flat, linear decay to 0."""
        lr, n = self.lr_value, self.n_steps
        warm = self.warmup_steps
        if warm and step < warm:
            return lr * (step + 1) / warm
        decay = int(round(self.lr_decay_fraction * n))
        start = n - decay
        if decay and step >= start:
            return lr * max(0.0, (n - step) / decay)
        return lr

    def uses_auxk(self) -> bool:
        return self.architecture in AUXK_ARCHITECTURES and self.aux_coefficient > 0

    def uses_sparse_kernel(self) -> bool:
        return self.kernel != "dense" and self.architecture in ("topk", "batchtopk")

    # --- (de)serialisation -------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["adam_betas"] = list(self.adam_betas)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SAETrainConfig:
        """Build from a dict (e.g. a checkpoint or JSON file); unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SAEConfigError(f"SAE config: unknown field(s) {', '.join(unknown)}; known fields are "
                                 f"{', '.join(sorted(known))}")
        data = dict(data)
        if "adam_betas" in data:
            data["adam_betas"] = tuple(data["adam_betas"])
        try:
            return cls(**data)
        except TypeError as err:
            raise SAEConfigError(f"SAE config: {err}") from err

    def describe(self) -> str:
        """A short name for logs and sweep directories: ``topk-d1024-k16``."""
        if self.architecture == "relu":
            return f"relu-d{self.d_sae}-l1{self.sparsity_value:g}"
        return f"{self.architecture}-d{self.d_sae}-k{self.k_value:g}"


def check_sweep(cfgs: list[SAETrainConfig]) -> None:
    """Refuse a sweep whose configs disagree on a data-stream field (:data:`SHARED_FIELDS`)."""
    if not cfgs:
        raise SAEConfigError("no SAE configs given; pass at least one SAETrainConfig")
    for cfg in cfgs[1:]:
        for name in SHARED_FIELDS:
            if getattr(cfg, name) != getattr(cfgs[0], name):
                raise SAEConfigError(
                    f"SAEs trained from one read of the data must share {name} (got {getattr(cfgs[0], name)!r} "
                    f"and {getattr(cfg, name)!r}); train them in separate runs or make them equal")
    seen = [c.to_dict() for c in cfgs]
    if any(a == b for i, a in enumerate(seen) for b in seen[i + 1:]):
        raise SAEConfigError("the sweep trains the same SAE twice (identical configs); drop the duplicate")
