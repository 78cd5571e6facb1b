"""misfeat's SAE training module: plain torch, in the normalised activation space.

:class:`SparseAutoencoder` holds the weights while training (encoder ``W_enc`` stored as
``[d_sae, d_in]`` rows so the sparse backward can scatter into them) and computes the
loss of a batch for the four architectures. It is never saved as such:
:func:`misfeat.sae.io.to_sae_lens` turns it into a sae-lens inference SAE with the input
normalisation folded in.

Loss (Gao et al. 2024, sec. 2.1 and A.2): the squared reconstruction error normalised
by a fixed variance (so the MSE term reads as the fraction of variance unexplained),
plus the architecture's sparsity or dead-latent term:

- topk / batchtopk / jumprelu: AuxK, the top ``aux_k`` *dead* latents reconstruct the
  residual ``x - x_hat`` (without the decoder bias), weighted by ``aux_coefficient`` and
  scaled down while few latents are dead (a JumpReLU latent below its threshold gets no
  gradient otherwise, and stays dead);
- relu: L1 of the activations (the decoder rows are unit norm, so this is the
  decoder-norm-weighted L1 of Conerly et al. 2024);
- jumprelu: also the quadratic L0 penalty around the target ``k`` (Gemma Scope 2), with
  the straight-through threshold gradient of Rajamanoharan et al. 2024.

The variance is fixed at initialisation, not recomputed per batch, so the loss is a
plain mean over rows: a data-parallel step over shards equals a step over their union.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from misfeat.sae import kernels
from misfeat.sae.config import SAETrainConfig

_BATCHTOPK_THRESHOLD_LR = 0.01  # EMA rate of the BatchTopK threshold, as in sae-lens
_JUMPRELU_INIT_THRESHOLD = 0.01  # before the data-dependent init_threshold
_JUMPRELU_START_L0_FACTOR = 16


class ForwardOutput(NamedTuple):
    """The loss of one batch and what the trainer tracks (all tensors on the SAE's device).

    Attributes:
        recon: ``[n, d_in]`` reconstruction, normalised space.
        loss: total loss (scalar).
        mse: squared error / (rows x fixed variance): the batch's fraction of variance
            unexplained against the *initial* variance.
        aux: the AuxK loss (0 when no latent is dead).
        sparsity: the L1 (relu) or L0 (jumprelu) penalty, 0 otherwise.
        l0: mean number of active latents per row.
        fired: ``[d_sae]`` bool, latents active on at least one row.
        min_active: batchtopk: smallest kept activation (threshold update), else None.
    """

    recon: torch.Tensor
    loss: torch.Tensor
    mse: torch.Tensor
    aux: torch.Tensor
    sparsity: torch.Tensor
    l0: torch.Tensor
    fired: torch.Tensor
    min_active: torch.Tensor | None


class SparseAutoencoder(nn.Module):
    """Weights and loss of one SAE in training (normalised space).

    Args:
        cfg: what to train.
        d_in: width of the activations.
        loss_variance: the fixed variance the squared error is divided by (mean squared
            distance of a row to the data mean, normalised space).
        device, dtype: where and in what precision the parameters live.
    """

    def __init__(self, cfg: SAETrainConfig, d_in: int, loss_variance: float = 1.0, *,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        super().__init__()
        self.cfg = cfg
        self.d_in, self.d_sae = d_in, cfg.d_sae
        gen = torch.Generator().manual_seed(cfg.seed)
        W_dec = torch.randn(cfg.d_sae, d_in, generator=gen, dtype=torch.float64)
        W_dec /= W_dec.norm(dim=-1, keepdim=True)
        # The encoder starts as the decoder's transpose (Gao et al. 2024, sec. 2.2).
        self.W_enc = nn.Parameter(W_dec.clone().to(device=device, dtype=dtype))
        self.W_dec = nn.Parameter(W_dec.to(device=device, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d_in, device=device, dtype=dtype))
        if cfg.architecture == "jumprelu":
            self.threshold = nn.Parameter(torch.full((cfg.d_sae,), _JUMPRELU_INIT_THRESHOLD,
                                                     device=device, dtype=dtype))
        # float64: the EMA moves by 1% of a small number per step
        self.register_buffer("topk_threshold", torch.zeros((), device=device, dtype=torch.float64))
        self.register_buffer("loss_variance", torch.tensor(float(loss_variance), device=device, dtype=dtype))

    # --- forward -------------------------------------------------------------------

    def forward(self, x_ND: torch.Tensor, dead_mask: torch.Tensor | None = None,
                sparse: bool | None = None) -> ForwardOutput:
        """Loss of the batch ``x_ND`` (normalised); ``dead_mask`` ``[d_sae]`` enables AuxK."""
        cfg = self.cfg
        sparse = cfg.uses_sparse_kernel() if sparse is None else sparse
        if sparse and cfg.architecture not in ("topk", "batchtopk"):
            raise ValueError(f"the sparse kernel applies to topk and batchtopk, not {cfg.architecture}")
        x_c = x_ND - self.b_dec
        zero = x_ND.new_zeros(())
        min_active = None
        if cfg.architecture in ("topk", "batchtopk"):
            if sparse:
                recon, pre, l0, fired, min_active = self._topk_sparse(x_c)
            else:
                recon, pre, l0, fired, min_active = self._topk_dense(x_c)
            sparsity = zero
        else:
            pre = torch.addmm(self.b_enc, x_c, self.W_enc.t())
            if cfg.architecture == "relu":
                acts = pre.relu()
                sparsity = cfg.sparsity_value * acts.sum(-1).mean()
                active = acts > 0
            else:
                acts = kernels.JumpReLU.apply(pre, self.threshold, cfg.jumprelu_bandwidth)
                l0_rows = kernels.Step.apply(pre, self.threshold, cfg.jumprelu_bandwidth).sum(-1)
                k = cfg.k_value
                sparsity = cfg.sparsity_value * (2.0 / k * (l0_rows - k) ** 2).mean()
                active = pre > self.threshold
            recon = acts @ self.W_dec + self.b_dec
            l0 = active.sum(-1).to(x_ND.dtype).mean()
            fired = active.any(0)
        mse = (recon - x_ND).pow(2).sum(-1).mean() / self.loss_variance
        aux = zero
        if dead_mask is not None and cfg.uses_auxk():
            aux = self._auxk(x_c, pre, (x_ND - recon).detach(), dead_mask, sparse)
        loss = mse + aux + sparsity
        return ForwardOutput(recon, loss, mse, aux, sparsity, l0, fired, min_active)

    def _topk_sparse(self, x_c):
        with torch.no_grad():
            pre = torch.addmm(self.b_enc, x_c, self.W_enc.t())
            code = self._select(pre)
        vals = kernels.gather_pre(pre, x_c, self.W_enc, self.b_enc, code).relu()
        recon = kernels.sparse_decode(vals, self.W_dec, code) + self.b_dec
        with torch.no_grad():
            active = vals > 0
            l0 = active.sum().to(vals.dtype) / code.n_rows
            fired = torch.zeros(self.d_sae, dtype=torch.bool, device=vals.device)
            fired[code.cols[active]] = True
            min_active = self._min_active(vals)
        return recon, pre, l0, fired, min_active

    def _topk_dense(self, x_c):
        """The plain computation (dense activations, autograd throughout): the reference."""
        pre = torch.addmm(self.b_enc, x_c, self.W_enc.t())
        n, m = pre.shape
        if self.cfg.architecture == "topk":
            vals, idx = pre.topk(int(self.cfg.k_value), dim=-1, sorted=False)
            acts = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
        else:
            vals, idx = pre.relu().reshape(-1).topk(max(1, int(self.cfg.k_value * n)), sorted=False)
            acts = torch.zeros_like(pre).reshape(-1).scatter(0, idx, vals).view(n, m)
        recon = acts @ self.W_dec + self.b_dec
        with torch.no_grad():
            active = acts > 0
            l0 = active.sum(-1).to(acts.dtype).mean()
            fired = active.any(0)
            min_active = self._min_active(acts)
        return recon, pre, l0, fired, min_active

    def _select(self, pre_NM: torch.Tensor) -> kernels.SparseCode:
        if self.cfg.architecture == "topk":
            return kernels.topk_code(pre_NM, int(self.cfg.k_value))
        return kernels.batchtopk_code(pre_NM.relu(), self.cfg.k_value)

    def _min_active(self, vals: torch.Tensor) -> torch.Tensor | None:
        if self.cfg.architecture != "batchtopk":
            return None
        positive = vals[vals > 0]
        return positive.min() if positive.numel() else None

    def _auxk(self, x_c, pre, residual, dead_mask, sparse: bool) -> torch.Tensor:
        """AuxK (Gao et al. 2024, sec. A.2): the top dead latents model the residual."""
        n_dead = int(dead_mask.sum())
        if n_dead == 0:
            return x_c.new_zeros(())
        aux_k = self.cfg.aux_k_value(self.d_in)
        k_aux = min(aux_k, n_dead)
        scale = min(n_dead / aux_k, 1.0)
        if sparse:
            # Only the dead latents' encoder and decoder rows enter (usually a few percent):
            # a plain product restricted to them, so its backward touches only those rows.
            dead_idx = dead_mask.nonzero().squeeze(1)
            pre_dead = torch.addmm(self.b_enc[dead_idx], x_c, self.W_enc[dead_idx].t())
            if k_aux < n_dead:
                vals, idx = pre_dead.topk(k_aux, dim=-1, sorted=False)
                acts = torch.zeros_like(pre_dead).scatter(-1, idx, vals.relu())
            else:
                acts = pre_dead.relu()
            e_hat = acts @ self.W_dec[dead_idx]
        else:
            masked = torch.where(dead_mask, pre, float("-inf"))
            vals, idx = masked.topk(k_aux, dim=-1, sorted=False)
            e_hat = torch.zeros_like(pre).scatter(-1, idx, vals.relu()) @ self.W_dec
        err = (e_hat - residual).pow(2).sum(-1).mean() / self.loss_variance
        return self.cfg.aux_coefficient * scale * err

    # --- inference (normalised space), the reference the saved SAE must reproduce -------

    @torch.no_grad()
    def encode(self, x_ND: torch.Tensor) -> torch.Tensor:
        """Dense ``[n, d_sae]`` activations as the saved inference SAE computes them."""
        pre = torch.addmm(self.b_enc, x_ND - self.b_dec, self.W_enc.t())
        arch = self.cfg.architecture
        if arch == "topk":
            code = kernels.topk_code(pre, int(self.cfg.k_value))
            return kernels.dense_acts(code, pre[code.rows, code.cols].relu(), self.d_sae)
        if arch == "relu":
            return pre.relu()
        threshold = self.threshold if arch == "jumprelu" else self.topk_threshold.to(pre.dtype)
        return pre.relu() * (pre > threshold)

    @torch.no_grad()
    def decode(self, acts_NM: torch.Tensor) -> torch.Tensor:
        return acts_NM @ self.W_dec + self.b_dec

    # --- constraints, applied by the trainer every step ------------------------------

    @torch.no_grad()
    def init_b_dec(self, mean_D: torch.Tensor) -> None:
        """Start the decoder bias at the data mean (normalised space)."""
        self.b_dec.copy_(mean_D.to(self.b_dec))

    @torch.no_grad()
    def init_threshold(self, x_ND: torch.Tensor) -> None:
        """JumpReLU: start each latent's threshold at the ``1 - 16 k / d_sae`` quantile of its
        pre-activations on ``x_ND`` (normalised): training starts near L0 = 16 k, and the L0
        penalty brings it down to k. Starting from zero thresholds (L0 ~ d_sae / 2) leaves a
        short run far above k; starting at L0 = k leaves most latents dead (measured on the
        organism, 1M tokens: 16 k -> L0 17, EV 0.918, 0.5% dead; k -> EV 0.945, 76% dead)."""
        if self.cfg.architecture != "jumprelu":
            return
        pre = torch.addmm(self.b_enc, x_ND - self.b_dec, self.W_enc.t())
        q = 1.0 - min(1.0, _JUMPRELU_START_L0_FACTOR * self.cfg.k_value / self.d_sae)
        self.threshold.copy_(torch.quantile(pre.float(), q, dim=0).clamp_min(0).to(self.threshold.dtype))

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Drop the part of each decoder row's gradient along the row (Bricken et al. 2023),
        so the step moves the direction, not the norm that :meth:`normalize_decoder` resets."""
        grad = self.W_dec.grad
        if grad is not None:
            grad -= (grad * self.W_dec).sum(-1, keepdim=True) * self.W_dec

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def project(self) -> None:
        """Constraints after an optimiser step: unit decoder rows, non-negative thresholds."""
        self.normalize_decoder()
        if self.cfg.architecture == "jumprelu":
            self.threshold.clamp_(min=0.0)

    @torch.no_grad()
    def update_topk_threshold(self, min_active: torch.Tensor | None) -> None:
        """BatchTopK: move the inference threshold towards the batch's smallest kept activation."""
        if min_active is not None:
            lr = _BATCHTOPK_THRESHOLD_LR
            self.topk_threshold.mul_(1 - lr).add_(lr * min_active.to(torch.float64))
