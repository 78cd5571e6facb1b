"""Train SAEs on a stream of activation batches: the loop, checkpoints, resume.

:func:`train_saes` reads ``Iterator[Tensor]`` once and feeds every batch to each SAE of a
sweep (e.g. several k or d_sae); :func:`train_sae` is the one-SAE case. Each SAE is a
:class:`misfeat.sae.model.SparseAutoencoder` trained with Adam under a warm-up / flat /
linear-decay learning rate, unit-norm decoder rows (the gradient along each row removed
before the step, rows renormalised after) and the AuxK dead-latent loss; it comes out
as a sae-lens SAE with the input scale folded in (:func:`misfeat.sae.io.to_sae_lens`).

Initialisation reads the first ``init_tokens`` rows (then trains on them too): the
scale that makes the mean squared norm d_in, the data mean (b_dec's start) and the
variance that normalises the loss. A checkpoint stores these, every SAE's weights,
Adam state and dead-latent counters, and the number of batches consumed; a resumed run
skips that many batches of the (identically ordered) stream and continues exactly.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from misfeat.errors import MisfeatError
from misfeat.sae.batching import rebatch
from misfeat.sae.config import SAETrainConfig, check_sweep
from misfeat.sae.distributed import World
from misfeat.sae.io import RunPaths, read_latest_checkpoint, save_sae, to_sae_lens, write_checkpoint
from misfeat.sae.model import ForwardOutput, SparseAutoencoder

if TYPE_CHECKING:
    from sae_lens import SAE

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "misfeat-sae-checkpoint"


DIVERGENCE_FACTOR = 100.0
"""training stops when the loss exceeds this multiple of its first value (at least 1)"""


class TrainingDivergedError(MisfeatError):
    """The loss became NaN, infinite or far above its start; the message names the step and what to change."""


@dataclass(frozen=True)
class DataStats:
    """Statistics of the first rows, fixed for the run.

    Attributes:
        scale: multiplier that makes the mean squared row norm d_in (1.0 without normalisation).
        mean: ``[d_in]`` mean row after scaling (b_dec's initial value).
        variance: mean squared distance of a scaled row to ``mean`` (the loss normaliser).
        n_rows: rows they were estimated from (over all processes).
    """

    scale: float
    mean: torch.Tensor
    variance: float
    n_rows: int

    def to_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "mean": self.mean.cpu(), "variance": self.variance, "n_rows": self.n_rows}


def estimate_stats(batches: Sequence[torch.Tensor], normalize: bool, world: World = World()) -> DataStats:
    """:class:`DataStats` of ``batches`` (pooled over processes), in float64."""
    rows = torch.cat([b.to(torch.float64) for b in batches])
    d_in = rows.shape[1]
    sums = world.sum(torch.cat([rows.sum(0), rows.pow(2).sum().reshape(1),
                                torch.tensor([rows.shape[0]], dtype=torch.float64, device=rows.device)]))
    n = int(sums[-1].item())
    mean = sums[:d_in] / n
    mean_sq_norm = float(sums[d_in]) / n
    if not math.isfinite(mean_sq_norm):
        raise MisfeatError("the first activation rows contain NaN or inf; check the cache or the model")
    if mean_sq_norm == 0:
        raise MisfeatError("the first activation rows are all zero; check the hook and positions they come from")
    scale = math.sqrt(d_in / mean_sq_norm) if normalize else 1.0
    variance = (mean_sq_norm - float(mean.pow(2).sum())) * scale**2
    return DataStats(scale, (mean * scale).float(), max(variance, 1e-12 * scale**2 * mean_sq_norm), n)


class SAETrainer:
    """One SAE's weights, optimiser and dead-latent counters; :meth:`step` trains on one batch."""

    def __init__(self, cfg: SAETrainConfig, d_in: int, stats: DataStats, device: torch.device,
                 world: World = World(), first_batch: torch.Tensor | None = None):
        dtype = getattr(torch, cfg.dtype)
        self.cfg, self.world = cfg, world
        self.module = SparseAutoencoder(cfg, d_in, stats.variance, device=device, dtype=dtype)
        self.module.init_b_dec(stats.mean.to(device))
        if first_batch is not None and cfg.architecture == "jumprelu":  # data-dependent thresholds
            self.module.init_threshold(first_batch.to(device=device, dtype=dtype))
            with torch.no_grad():  # the same start on every process
                self.module.threshold.copy_(world.sum(self.module.threshold.detach()) / world.size)
        fused = device.type == "cuda"
        self.optimizer = torch.optim.Adam(self.module.parameters(), lr=cfg.lr_at(0), betas=cfg.adam_betas,
                                          fused=fused or None)
        self.tokens_since_fired = torch.zeros(cfg.d_sae, dtype=torch.long, device=device)
        self.uses_aux = cfg.uses_auxk()
        self.first_loss: float | None = None

    def dead_mask(self) -> torch.Tensor:
        return self.tokens_since_fired >= self.cfg.dead_tokens_value

    def step(self, x_ND: torch.Tensor, step: int) -> ForwardOutput:
        """One optimiser step on this process's rows ``x_ND`` (already scaled)."""
        lr = self.cfg.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        out = self.module(x_ND, self.dead_mask() if self.uses_aux else None)
        out.loss.backward()
        params = list(self.module.parameters())
        self.world.all_reduce_grads(params)
        loss = out.loss.detach()
        if self.first_loss is None:
            self.first_loss = float(loss) if bool(torch.isfinite(loss)) else 1.0
        bad = ~torch.isfinite(loss) | (loss > DIVERGENCE_FACTOR * max(abs(self.first_loss), 1.0))
        flags = self.world.any(torch.cat([out.fired, bad.reshape(1)]))
        if flags[-1]:
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingDivergedError(f"step {step}: loss {loss.item():.4g}, first loss {self.first_loss:.4g}")
        self.module.remove_parallel_grad()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.module.project()
        self.tokens_since_fired += x_ND.shape[0] * self.world.size
        self.tokens_since_fired[flags[:-1]] = 0
        if self.cfg.architecture == "batchtopk":
            self.module.update_topk_threshold(self.world.min(out.min_active))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "tokens_since_fired": self.tokens_since_fired, "first_loss": self.first_loss}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.tokens_since_fired.copy_(state["tokens_since_fired"])
        self.first_loss = state.get("first_loss")


def train_sae(batches: Iterable[torch.Tensor], cfg: SAETrainConfig, **kwargs: Any) -> SAE:
    """Train one SAE on ``batches``; see :func:`train_saes` for the keyword arguments."""
    return train_saes(batches, [cfg], **kwargs)[0]


def train_saes(batches: Iterable[torch.Tensor], cfgs: Sequence[SAETrainConfig], *,
               out_dir: str | os.PathLike | None = None, resume: bool = False,
               metadata: dict[str, Any] | None = None, show_progress: bool | None = None,
               on_log: Callable[[int, list[dict[str, float]]], None] | None = None,
               init: SAE | None = None) -> list[SAE]:
    """Train every SAE of ``cfgs`` from one read of ``batches``; return them as sae-lens SAEs.

    Args:
        batches: ``[rows, d_in]`` activation chunks of any size (cut into ``batch_size``
            batches here; under torchrun, this process's share of the rows).
        cfgs: the SAEs; they must agree on :data:`misfeat.sae.config.SHARED_FIELDS`.
        out_dir: save the SAEs here (SAELens layout; one subdirectory per SAE of a sweep)
            and the checkpoints under ``out_dir/checkpoints``.
        resume: continue from the newest checkpoint in ``out_dir`` (the stream must
            replay the same batches in the same order); starts fresh when there is none.
        metadata: extra SAE metadata (e.g. ``model_name``), saved in ``cfg.json``.
        show_progress: the progress bar with live L0, explained variance and dead
            fraction (default: on a terminal, process 0 only).
        on_log: called on process 0 every ``log_every`` steps with the step and, per SAE,
            its live ``L0``, ``EV``, ``dead`` and ``loss`` (e.g. to log to wandb; nothing
            is sent anywhere unless a callback does it).
        init: start every SAE from this sae-lens SAE's weights instead of a random dictionary
            (fine-tuning a dictionary, e.g. on a fine-tuned model's activations: stage-wise
            model diffing, :mod:`misfeat.sae.adapt`); the configs must match its width and
            architecture. A resumed run continues from its checkpoint.
    """
    cfgs = list(cfgs)
    check_sweep(cfgs)
    first, world = cfgs[0], World.current()
    if first.batch_size % world.size:
        raise MisfeatError(f"batch_size={first.batch_size} is not divisible by the {world.size} processes")
    if resume and out_dir is None:
        raise MisfeatError("resume=True needs out_dir, the directory holding the checkpoints")
    if out_dir is not None:
        from misfeat.validate import check_out_dir

        check_out_dir(out_dir, "out_dir")
    from misfeat.models import resolve_device

    device = resolve_device(first.device)
    paths = RunPaths(Path(out_dir)) if out_dir is not None else None
    stream = rebatch(batches, first.batch_size // world.size)
    found = read_latest_checkpoint(paths, device) if resume and paths is not None else None
    if found is not None:
        path, state = found
        _check_resume(path, state, cfgs, world, _origin(metadata))
        stats = DataStats(**state["stats"])
        start = int(state["step"])
        logger.info("resuming from %s: skipping the %d batches already trained on", path, start)
        for _ in itertools.islice(stream, start):
            pass
    else:
        if resume:
            logger.info("no checkpoint in %s; starting from scratch", paths.checkpoints)
        head = list(itertools.islice(stream, max(1, math.ceil(first.init_tokens / first.batch_size))))
        if world.any(torch.tensor([not head])):  # every process must have rows, or all stop together
            raise MisfeatError(f"the activation stream of process {world.rank} of {world.size} yielded no full "
                               f"batch of {first.batch_size // world.size} rows; give more data (or, "
                               "data-parallel, a stream that every process gets rows of)")
        stats = estimate_stats([b.to(device) for b in head], first.normalize, world)
        stream, start, state = itertools.chain(head, stream), 0, None
    d_in = stats.mean.shape[0]
    first_rows = None if state is not None else head[0].to(device) * stats.scale
    trainers = [SAETrainer(cfg, d_in, stats, device, world, first_rows) for cfg in cfgs]
    if init is not None and state is None:
        from misfeat.sae.io import load_sae_lens_into

        for trainer in trainers:
            load_sae_lens_into(trainer.module, init, stats.scale)
    if state is not None:
        for trainer, trainer_state in zip(trainers, state["trainers"], strict=True):
            trainer.load_state_dict(trainer_state)
    step, elapsed, last = _loop(stream, trainers, stats, start, device, world, paths, show_progress,
                                state["elapsed"] if state else 0.0, on_log, _origin(metadata))
    saes = []
    for index, trainer in enumerate(trainers):
        info = {"config": trainer.cfg.to_dict(), "scale": stats.scale, "steps": step,
                "tokens": step * first.batch_size, "world_size": world.size,
                "tokens_per_s": step * first.batch_size / elapsed if elapsed > 0 else None,
                "last_batch": last[index] if last else None}
        sae = to_sae_lens(trainer.module, stats.scale, {**(metadata or {}), "misfeat_training": info})
        if paths is not None and world.is_main:
            save_sae(sae, paths.sae_dir(cfgs, index))
        saes.append(sae)
    world.barrier()
    return saes


def _loop(stream, trainers: list[SAETrainer], stats: DataStats, start: int, device: torch.device, world: World,
          paths: RunPaths | None, show_progress: bool | None, elapsed: float,
          on_log: Callable[[int, list[dict[str, float]]], None] | None = None, origin: dict[str, Any] | None = None
          ) -> tuple[int, float, list[dict[str, float]]]:
    """Run steps ``start..n_steps``; return the steps completed, the training seconds and
    the live statistics of the last logged batch."""
    from misfeat.io import progress

    cfg = trainers[0].cfg
    n_steps, dtype = cfg.n_steps, getattr(torch, cfg.dtype)
    scale = torch.tensor(stats.scale, device=device, dtype=dtype)
    bar = progress(total=n_steps, initial=start, desc="train-sae", unit="step",
                   disable=None if (show_progress is None and world.is_main) else not (show_progress and world.is_main))
    step, t0, last = start, time.perf_counter(), []
    try:
        for step in range(start, n_steps):
            batch = next(stream, None)
            if world.any(torch.tensor([batch is None])):  # one process out of data: all stop
                logger.warning("the activation stream ended after %d of %d steps (%d tokens); the learning rate "
                               "did not finish its decay; give more data or fewer total_tokens",
                               step, n_steps, step * cfg.batch_size)
                break
            x = batch.to(device=device, dtype=dtype, non_blocking=True) * scale
            outs = [_step_or_explain(t, x, step, paths) for t in trainers]
            if (step + 1) % cfg.log_every == 0 or step + 1 == n_steps:
                last = _live_stats(x, outs, trainers)
                bar.set_postfix({key: ",".join(format(s[key], f) for s in last)
                                 for key, f in (("L0", ".1f"), ("EV", ".3f"), ("dead", ".1%"))}, refresh=False)
                if on_log is not None and world.is_main:
                    on_log(step + 1, last)
            bar.update(1)
            done = step + 1
            if paths is not None and cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < n_steps:
                _checkpoint(paths, done, trainers, stats, world, elapsed + time.perf_counter() - t0, origin)
        else:
            step = n_steps
    finally:
        bar.close()
    return step, elapsed + time.perf_counter() - t0, last


def _step_or_explain(trainer: SAETrainer, x: torch.Tensor, step: int, paths: RunPaths | None) -> ForwardOutput:
    try:
        return trainer.step(x, step)
    except TrainingDivergedError as err:
        lr = trainer.cfg.lr_at(step)
        kept = []
        if paths is not None:  # a checkpoint at or after this step holds the weights that diverged
            kept = [p for p in paths.list_checkpoints() if int(p.name[5:-3]) < step]
            if trainer.world.is_main:
                for bad in paths.list_checkpoints()[len(kept):]:
                    bad.rename(bad.with_name(f"diverged-{bad.name}"))
        where = (f"the last good checkpoint {kept[-1]} is kept" if kept
                 else "no good checkpoint was written (set checkpoint_every and out_dir to keep one)")
        raise TrainingDivergedError(
            f"SAE {trainer.cfg.describe()}: training diverged at {err} (learning rate {lr:.3g}). "
            f"Lower the learning rate (e.g. lr={lr / 3:.2g}, --lr) or check the activations for NaN/inf; {where}"
        ) from None


@torch.no_grad()
def _live_stats(x: torch.Tensor, outs: list[ForwardOutput], trainers: list[SAETrainer]) -> list[dict[str, float]]:
    """Per SAE: L0, explained variance (against this batch's mean), dead fraction, loss."""
    sst = (x - x.mean(0)).pow(2).sum()
    return [{"L0": float(o.l0), "EV": float(1 - (o.recon - x).pow(2).sum() / sst),
             "dead": float(t.dead_mask().float().mean()), "loss": float(o.loss.detach())}
            for o, t in zip(outs, trainers, strict=True)]


def _origin(metadata: dict[str, Any] | None) -> dict[str, Any]:
    """The model the training rows come from, as far as ``metadata`` records it."""
    return {k: v for k, v in (metadata or {}).items() if k in ("model_fingerprint", "model_architecture")}


def _checkpoint(paths: RunPaths, step: int, trainers: list[SAETrainer], stats: DataStats, world: World,
                elapsed: float, origin: dict[str, Any] | None = None) -> None:
    if world.is_main:
        write_checkpoint(paths, step, {
            "format": CHECKPOINT_FORMAT, "version": 1, "step": step, "world_size": world.size,
            "configs": [t.cfg.to_dict() for t in trainers], "stats": stats.to_dict(),
            "trainers": [t.state_dict() for t in trainers], "elapsed": elapsed, "origin": origin or {},
        })
    world.barrier()


def _check_resume(path: Path, state: dict[str, Any], cfgs: list[SAETrainConfig], world: World,
                  origin: dict[str, Any] | None = None) -> None:
    if state.get("format") != CHECKPOINT_FORMAT:
        raise MisfeatError(f"{path} is not a misfeat SAE checkpoint")
    saved = state["configs"]
    now = [c.to_dict() for c in cfgs]
    if saved != now:
        diffs = sorted({k for a, b in zip(saved, now, strict=False) for k in a if a.get(k) != b.get(k)})
        if len(saved) != len(now):
            diffs.append(f"number of SAEs {len(saved)} -> {len(now)}")
        raise MisfeatError(f"cannot resume from {path}: the configuration changed ({', '.join(diffs)}); resume "
                           "with the same settings or use a new output directory")
    if state["world_size"] != world.size:
        raise MisfeatError(f"cannot resume from {path}: it was written by {state['world_size']} processes, this run "
                           f"has {world.size}; each process's rows would differ")
    saved_model, now_model = state.get("origin", {}).get("model_fingerprint"), (origin or {}).get("model_fingerprint")
    if saved_model and now_model and saved_model != now_model:
        raise MisfeatError(f"cannot resume from {path}: it trained on activations of model {saved_model}, this data "
                           f"comes from model {now_model}; resume with the same --cache/--model or use a new --out")
