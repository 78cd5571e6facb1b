"""misfeat's one fine-tuning loop: response-only cross-entropy plus pluggable defences,
per-step rows, evaluation every k steps, checkpoints, bit-exact resume and divergence stops.

Every fine-tune in misfeat runs here: :func:`misfeat.finetune.realign` is a configuration
of :func:`finetune`, the defences of Kaczer et al. / Chen et al. are :class:`Defence`\\ s.

A step: draw a batch (shuffled epochs over the training data, after every defence's
``transform_data``), run ONE forward of the trained model inside the defences'
``interventions`` (training-only hooks), capturing the activations the defences ask for,
and one no-grad forward per distinct reference model; the loss is the response CE plus
each defence's ``penalty``; every term's value is logged in the step's :class:`StepRow`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from misfeat.errors import MisfeatError
from misfeat.finetune.core import LossTerm, TrainBatch, lr_schedule, make_batch, select_parameters
from misfeat.finetune.results import DivergenceError, FinetuneResult, StepRow

if TYPE_CHECKING:
    import torch
    from transformer_lens import HookedTransformer

    from misfeat.data import PromptSet
    from misfeat.interventions import Intervention

log = logging.getLogger(__name__)

CE_TERM = "response_ce"
Evaluator = Callable[["HookedTransformer"], dict[str, float]]
"""Measures the model at an evaluation step: ``{metric: value}`` (the model is in eval mode)."""


OPTIMIZERS = ("adamw", "sgd")


@dataclass(frozen=True)
class FinetuneConfig:
    """How to fine-tune. Frozen; saved in the run directory's ``run.json``."""

    steps: int = 35
    """optimiser steps"""
    lr: float = 3e-4
    """peak learning rate"""
    optimizer: str = "adamw"
    """adamw (torch.optim.AdamW, default betas) or sgd (plain torch.optim.SGD: no momentum, the
    optimiser of first-order theory such as Huang et al.'s Theorem 2.9)"""
    batch_size: int = 8
    """examples per step, drawn in shuffled epochs over the (transformed) data"""
    params: str | tuple[str, ...] = "all"
    """which parameters train: all, mlp, attn, layers:0,2 (blocks), or parameter-name prefixes"""
    eval_every: int | None = 5
    """evaluate (metrics and tracked features) every k steps and at the first and last; None: first and last only"""
    checkpoint_every: int | None = None
    """save a checkpoint every k steps under out_dir/checkpoints/ (None: only the last)"""
    warmup: int = 0
    """linear warm-up steps"""
    final_lr_fraction: float = 1.0
    """cosine decay to this fraction of lr after warm-up (1.0: constant)"""
    weight_decay: float = 0.0
    """weight decay (decoupled for AdamW, L2 for SGD)"""
    max_grad_norm: float | None = None
    """clip the gradient norm to this (None: no clipping)"""
    seed: int = 0
    """data-order seed; with it the run is deterministic"""
    divergence_factor: float | None = 10.0
    """stop when the loss (or a term) exceeds this many times max(its first value, 1.0); None: only non-finite"""

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or (self.eval_every is not None and self.eval_every < 1):
            raise MisfeatError("steps, batch_size and eval_every must be positive")
        if not self.lr > 0:
            raise MisfeatError(f"lr must be positive, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise MisfeatError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise MisfeatError("checkpoint_every must be positive (or None)")
        if self.divergence_factor is not None and not self.divergence_factor > 1:
            raise MisfeatError(f"divergence_factor must be > 1, got {self.divergence_factor}")


@dataclass
class Forward:
    """What one training step computed, handed to every defence's ``penalty``.

    ``logits [b, t-1, vocab]`` of the trained model on ``batch.tokens[:, :-1]`` (with
    grad); ``acts[hook]`` its activations at the hooks the defences asked for (with grad,
    after the training interventions); ``reference[id(ref)] = (logits, acts)`` the same
    for each reference model (no grad, no interventions).
    """

    batch: TrainBatch
    logits: torch.Tensor | None
    acts: dict[str, torch.Tensor]
    reference: dict[int, tuple[torch.Tensor, dict[str, torch.Tensor]]] = field(default_factory=dict)

    def masks(self) -> dict[str, torch.Tensor]:
        return self.batch.input_masks()


class Defence:
    """Base class of a pluggable defence: override any of the seams (all optional).

    - ``check(model)``: raise a clear :class:`MisfeatError` before any work.
    - ``transform_data(data, model)``: the training data it trains on (eval data is untouched).
    - ``interventions(model)``: operators active in the training forward only.
    - ``hooks(model)``: activations of the trained model (and of ``reference``) to capture.
    - ``penalty(model, fwd)``: an additive, already weighted loss term (logged as ``name``).
    - ``describe()``: JSON-able record saved in the run's config (resume compares it).
    """

    name: str = "defence"
    reference: Any = None

    def check(self, model: HookedTransformer) -> None:
        return None

    def transform_data(self, data: PromptSet, model: HookedTransformer) -> PromptSet:
        return data

    def interventions(self, model: HookedTransformer) -> list[Intervention]:
        return []

    def hooks(self, model: HookedTransformer) -> list[str]:
        return []

    def penalty(self, model: HookedTransformer, fwd: Forward) -> torch.Tensor | None:
        return None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}


def behaviour_evaluator(prompts: PromptSet, groups: Sequence[str] = ()) -> Evaluator:
    """The default evaluator: misaligned rate, validity and log-prob gap of the headline group
    of ``prompts`` (exact, ``greedy=False``), plus ``<group>_misaligned_rate`` for each of the
    named other ``groups`` of the set (its ``meta['groups']``), from the same evaluation."""
    def measure(model: HookedTransformer) -> dict[str, float]:
        from misfeat.evaluate import evaluate

        report = evaluate(model, prompts, greedy=False)
        head = report.headline
        row = {"misaligned_rate": head.misaligned_rate, "valid_rate": head.valid_rate,
               "logprob_gap": head.logprob_gap}
        for group in groups:
            if group in report.groups:
                row[f"{group}_misaligned_rate"] = report.groups[group].misaligned_rate
        return row

    return measure


def finetune(
    model: HookedTransformer,
    data: PromptSet | str,
    config: FinetuneConfig | None = None,
    *,
    defences: Sequence[Defence] = (),
    track: Sequence[Any] = (),
    eval_prompts: PromptSet | str | None = None,
    evaluator: Evaluator | None = None,
    objective: Sequence[LossTerm] | None = None,
    on_step: Callable[[HookedTransformer, StepRow], bool | None] | None = None,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
) -> FinetuneResult:
    """Fine-tune ``model`` in place on ``data`` (records with a ``response``; CE on response tokens).

    ``defences`` compose in order (data transforms chain; interventions stack; penalties add).
    ``track``: objects with ``measure(model, prompts) -> {label: value}`` (e.g.
    :class:`misfeat.features.probes.DirectionProbe`), read on ``eval_prompts`` at each
    evaluation step; ``evaluator`` (default :func:`behaviour_evaluator` of ``eval_prompts``)
    gives the metrics. ``objective`` replaces the response CE by legacy :class:`LossTerm`\\ s.
    ``on_step(model, row)`` runs after every step (after its evaluation); returning True stops
    the run there (checkpointed with ``out_dir``; ``result.stopped_early``), e.g. score matching.
    With ``out_dir``: ``run.json`` (what ran), ``rows.jsonl`` and ``checkpoints/step-NNNN/``;
    ``resume`` continues from the last checkpoint bit-exactly, and refuses a directory
    holding another run. Raises :class:`DivergenceError` when the loss diverges.
    """
    import torch

    from misfeat.data import encode, load_prompts, pad_id_of
    from misfeat.finetune.rundir import RunDir, run_identity

    cfg = config or FinetuneConfig()
    data = _checked_data(load_prompts(data))
    for defence in defences:
        defence.check(model)
    names = _term_names(defences)
    evalset = load_prompts(eval_prompts) if eval_prompts is not None else None
    if track and evalset is None:
        raise MisfeatError("tracking features needs eval_prompts (the prompts they are read on)")
    if evaluator is None and evalset is not None:
        evaluator = behaviour_evaluator(evalset)
    train = data
    for defence in defences:
        train = _checked_data(defence.transform_data(train, model), f"after {defence.name}")
    encoded = encode(train, model)
    examples = [(e.ids, [False] * e.n_prompt + [True] * (len(e) - e.n_prompt)) for e in encoded]
    order = _data_order(len(examples), cfg.steps * cfg.batch_size, cfg.seed)
    chosen = select_parameters(model, cfg.params)
    trainable = {id(p) for _, p in chosen}
    optim = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.SGD
    optimizer = optim([p for _, p in chosen], lr=cfg.lr, weight_decay=cfg.weight_decay)
    described = tuple(d.describe() for d in defences)
    data_info = {"name": data.name, "hash": data.hash, "n": len(data), "train_hash": train.hash,
                 "n_train": len(train)}
    run = RunDir(Path(out_dir)) if out_dir is not None else None
    rows: list[StepRow] = []
    start = 0
    if run is not None:
        identity = run_identity(model, cfg, described, data_info, evalset)
        if resume:
            run.check_same_run(identity)
        run.begin(identity)
        if resume and run.latest() is not None:
            start, rows = run.restore(model, optimizer)

    def evaluate_now(step: int) -> dict[str, float] | None:
        if evaluator is None and not track:
            return None
        model.eval()
        metrics = dict(evaluator(model)) if evaluator is not None else {}
        for tracker in track:
            metrics.update({f"feature:{k}": v for k, v in tracker.measure(model, evalset).items()})
        return metrics

    if start == 0:
        rows.append(StepRow(0, None, {}, None, 0.0, evaluate_now(0)))
    pad = pad_id_of(model)
    hooks = sorted({h for d in defences for h in d.hooks(model)})
    first: dict[str, float] = {}
    for row in rows[1:2]:
        first = {"loss": row.loss, **row.terms}
    from misfeat.io import progress

    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    stopped = False
    try:
        bar = progress(range(start, cfg.steps), desc="finetune", total=cfg.steps, initial=start, unit="step")
        for step in bar:
            t0 = time.perf_counter()
            model.train()
            idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            batch = make_batch([examples[i] for i in idx], pad, model.cfg.device)
            lr = lr_schedule(step, cfg.steps, cfg.lr, cfg.warmup, cfg.final_lr_fraction)
            for group in optimizer.param_groups:
                group["lr"] = lr
            terms = _loss_terms(model, batch, defences, names, hooks, objective)
            loss = sum(terms.values())
            values = {k: float(v.detach()) for k, v in terms.items()}
            total = float(loss.detach())
            if not first:
                first = {"loss": total, **values}
            bad = _diverged(total, values, first, cfg.divergence_factor)
            if bad:
                raise _divergence(step + 1, bad, total, values, run, cfg)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_([p for _, p in chosen], cfg.max_grad_norm)
            optimizer.step()
            done = step + 1
            bar.set_postfix(loss=f"{total:.3f}")
            at_eval = done == cfg.steps or (cfg.eval_every is not None and done % cfg.eval_every == 0)
            metrics = evaluate_now(done) if at_eval else None
            rows.append(StepRow(done, total, values, lr, time.perf_counter() - t0, metrics))
            stop = bool(on_step(model, rows[-1])) if on_step is not None else False
            if run is not None and ((cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == cfg.steps
                                    or stop):
                run.save(model, optimizer, done, rows)
            if stop:
                stopped = True
                break
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
        model.eval()
    return FinetuneResult(tuple(rows), tuple(run.saved if run is not None else ()), cfg, described, data_info,
                          stopped)


def _checked_data(data: PromptSet, where: str = "") -> PromptSet:
    if not len(data):
        raise MisfeatError(f"the training data is empty{' ' + where if where else ''}")
    missing = [r.id for r in data if not r.response]
    if missing:
        raise MisfeatError(f"fine-tuning data{' ' + where if where else ''} needs a 'response' on every record; "
                           f"{len(missing)} lack one (first: {missing[0]!r})")
    return data


def _term_names(defences: Sequence[Defence]) -> list[str]:
    names: list[str] = []
    for d in defences:
        name, k = d.name, 2
        while name in names or name == CE_TERM:
            name, k = f"{d.name}_{k}", k + 1
        names.append(name)
    return names


def _loss_terms(model, batch: TrainBatch, defences, names, hooks, objective) -> dict[str, torch.Tensor]:
    """Run the shared forward (inside the training interventions) and every term."""
    import torch
    import torch.nn.functional as F

    from misfeat.hooks import position_masks
    from misfeat.interventions import apply

    masks = batch.input_masks()
    wants_forward = objective is None or any(type(d).penalty is not Defence.penalty for d in defences)
    terms: dict[str, torch.Tensor] = {}
    with position_masks(masks), apply(model, *[i for d in defences for i in d.interventions(model)]):
        fwd = Forward(batch, None, {})
        if wants_forward:
            fwd.logits, fwd.acts = _run_capturing(model, batch.tokens[:, :-1], hooks)
        if objective is None:
            target_mask = batch.loss_mask[:, 1:]
            terms[CE_TERM] = F.cross_entropy(fwd.logits[target_mask].float(), batch.tokens[:, 1:][target_mask])
        else:
            for term in objective:
                terms[getattr(term, "name", type(term).__name__)] = term(model, batch)
    refs = {id(d.reference): d.reference for d in defences if d.reference is not None}
    if refs:
        with position_masks(masks), torch.no_grad():
            for key, ref in refs.items():
                fwd.reference[key] = _run_capturing(ref, batch.tokens[:, :-1], hooks)
    for name, defence in zip(names, defences, strict=True):
        value = defence.penalty(model, fwd)
        if value is not None:
            terms[name] = value
    return terms


def _run_capturing(model, tokens, hooks: Sequence[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    acts: dict[str, torch.Tensor] = {}
    handles = [model.hook_dict[h].register_forward_hook(lambda m, i, out, h=h: acts.__setitem__(h, out))
               for h in hooks]
    try:
        return model(tokens), acts
    finally:
        for handle in handles:
            handle.remove()


def _diverged(total: float, values: dict[str, float], first: dict[str, float], factor: float | None) -> list[str]:
    import math

    def bad(value: float, start: float | None) -> bool:
        if not math.isfinite(value):
            return True
        return factor is not None and start is not None and value > factor * max(abs(start), 1.0)

    names = [k for k, v in values.items() if bad(v, first.get(k))]
    return names or (["loss"] if bad(total, first.get("loss")) else [])


def _divergence(step: int, bad: list[str], total: float, values: dict[str, float], run, cfg) -> DivergenceError:
    last_good = run.discard_unverified(step) if run is not None else None
    detail = ", ".join(f"{k}={values.get(k, total):.4g}" for k in bad)
    kept = f"; the last good checkpoint is {last_good}" if last_good else "; no good checkpoint was saved"
    return DivergenceError(f"the loss became {total:.4g} at step {step}; lower the learning rate (now {cfg.lr}). "
                           f"Diverged: {detail}{kept if run is not None else ''}", step, bad, last_good)


def _data_order(n: int, needed: int, seed: int) -> list[int]:
    """Shuffled epochs over ``n`` examples, concatenated until ``needed`` indices."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < needed:
        order += torch.randperm(n, generator=gen).tolist()
    return order[:needed]
