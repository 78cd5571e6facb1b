"""Alignment recovery by sparse weight restoration with rollback (Yang et al. 2025).

Yang, Tao, Chen, Xu, "Alleviating the Fear of Losing Alignment in LLM Fine-tuning" (IEEE
S&P 2025, arXiv 2504.09757; code kangyangWHU/LLMAlignment, ``sgdg_rollback_final.py``)
recover the alignment a fine-tune lost without new training data: a few weights of the
fine-tuned model go back to the aligned model's values, chosen by gradient. It sits beside
:func:`misfeat.finetune.realign` (re-alignment by fine-tuning) at the end of the flow, and
works on any pair of TransformerLens models of one architecture.

The algorithm, as the authors' code runs it:

- direction ``d_h``: the aligned model's mean last-prompt-token residual (``resid_post``
  of block ``layer``) over the probe prompts; loss ``-cos(h(W), d_h)`` with ``h(W)`` the
  fine-tuned state's batch mean, averaged over batches;
- candidates: the weights of blocks ``0..layer`` except norms (no embeddings, no
  unembedding); each step restores, among candidates whose ``W - W_aligned`` has the
  sign that lowers the loss to first order (``(W - W_al) * grad > 0``), the ``fraction``
  of *all* parameters with the largest ``|grad|``;
- after ``warmup`` steps, if task utility fell more than ``tolerance`` (relative) below
  the fine-tuned model's, restart from the fine-tuned model and, after every step, put
  back the ``rollback_fraction`` of that step's restorations whose return to the
  fine-tuned values most raises the cosine to the task direction (the fine-tuned model's
  mean state on the task prompts);
- checkpoints every ``select_every`` steps; the chosen one is the last before utility
  first fails (the final step if none fails).

Gradients are *not* zeroed between steps outside rollback in the authors' code, so the
ranking at step t uses the sum of the gradients of steps 1..t (``accumulate=True``, the
default here, to be faithful); ``accumulate=False`` ranks by the current gradient only.
A restored weight equals its aligned value, so the state of a run is its boolean mask:
the mask is saved (safetensors) and :func:`apply_mask` replays it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from misfeat.errors import MisfeatError
from misfeat.restore_engine import (
    MASK_FILE,
    Restorer,
    apply_mask,
    candidate_names,
    direction_loss,
    load_mask,
    mask_stats,
    save_mask,
)

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from misfeat.data import PromptSet

logger = logging.getLogger(__name__)

__all__ = ["RestoreConfig", "RestoreResult", "RestoreStep", "apply_mask", "candidate_names", "check_pair",
           "load_mask", "mask_stats", "plot_restore", "restore_alignment", "task_utility"]

MASK_MODES = ("grad", "random", "full")
ROLLBACK_MODES = ("auto", "never", "always")
CANDIDATE_MODES = ("below", "blocks")
# config fields that must match between two architectures for weights to correspond
_ARCH_FIELDS = ("n_layers", "d_model", "n_heads", "d_head", "d_mlp", "d_vocab", "n_ctx", "act_fn",
                "normalization_type", "positional_embedding_type", "n_key_value_heads", "original_architecture")


@dataclass(frozen=True)
class RestoreConfig:
    """How to restore (defaults: the authors' ``run_recover_exp.py``, with the 2/3-depth layer)."""

    layer: int | None = None
    """block whose resid_post gives the direction (None: round(2/3 * n_layers) - 1, i.e. hidden_states[L_end])"""
    fraction: float = 0.002
    """weights restored per step, as a fraction of ALL parameters (embeddings included)"""
    steps: int = 20
    """restoration steps"""
    warmup: int = 5
    """steps before the one utility check that decides whether to restart with rollback"""
    rollback: str = "auto"
    """auto (the authors' check after warm-up), never (ablation), always (from the start)"""
    rollback_fraction: float = 0.2
    """share of a step's sign-selected restorations put back in rollback mode"""
    tolerance: float = 0.05
    """utility may fall this much (relative) below the fine-tuned model's"""
    mask: str = "grad"
    """grad (the method), random (same size, ablation), full (W := W_aligned, ablation; kept as is, no walk)"""
    sign: bool = True
    """restore only weights whose difference has the loss-lowering sign (False: ablation)"""
    accumulate: bool = True
    """rank by gradients summed over steps, never zeroed outside rollback (the authors' code)"""
    candidates: str = "below"
    """below (blocks 0..layer) or blocks (every block); norms excluded unless norms=True"""
    norms: bool = False
    """include normalisation weights among the candidates"""
    select_every: int = 5
    """checkpoint cadence of the selection walk (the authors save every 5 steps)"""
    batch_size: int = 64
    """prompts per forward in the gradient and direction passes"""
    seed: int = 0
    """seed of the random-mask ablation"""

    def __post_init__(self) -> None:
        for name, allowed in (("mask", MASK_MODES), ("rollback", ROLLBACK_MODES), ("candidates", CANDIDATE_MODES)):
            if getattr(self, name) not in allowed:
                raise MisfeatError(f"{name}={getattr(self, name)!r}; choose one of {', '.join(allowed)}")
        if not 0 < self.fraction <= 1 or not 0 <= self.rollback_fraction <= 1:
            raise MisfeatError("fraction must be in (0, 1] and rollback_fraction in [0, 1]")
        if self.steps < 1 or self.warmup < 0 or self.select_every < 1 or self.batch_size < 1:
            raise MisfeatError("steps, select_every and batch_size must be positive, warmup >= 0")
        if not 0 <= self.tolerance < 1:
            raise MisfeatError(f"tolerance must be in [0, 1), got {self.tolerance}")

    def resolve_layer(self, n_layers: int) -> int:
        layer = max(0, round(2 * n_layers / 3) - 1) if self.layer is None else self.layer
        if not 0 <= layer < n_layers:
            raise MisfeatError(f"layer {layer} is out of range: the model has blocks 0..{n_layers - 1}")
        return layer


@dataclass(frozen=True)
class RestoreStep:
    """The state after one step (step 0: the fine-tuned model)."""

    step: int
    restored: int
    """weights equal to the aligned model's by restoration (the mask's size)"""
    restored_fraction: float
    """restored / all parameters"""
    put_back: int
    """weights returned to the fine-tuned values by this step's rollback"""
    loss: float
    """-cos(state, aligned direction) on the probe prompts"""
    utility: float
    heldout_misaligned: float | None
    em_domain_misaligned: float | None
    tracked: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RestoreResult:
    """A restoration run: per-step rows, the chosen checkpoint, what it cost."""

    config: RestoreConfig
    layer: int
    n_params: int
    n_candidates: int
    rows: tuple[RestoreStep, ...]
    """the kept pass (after the restart when rollback switched on)"""
    warmup_rows: tuple[RestoreStep, ...]
    """the discarded warm-up pass when rollback restarted the run (else empty)"""
    rolled_back: bool
    chosen_step: int
    utility_before: float
    wall_s: float
    mask_path: str | None = None

    @property
    def chosen(self) -> RestoreStep:
        return next(r for r in self.rows if r.step == self.chosen_step)

    def summary(self) -> dict[str, Any]:
        cols = ("step", "restored", "restored_fraction", "put_back", "loss", "utility", "heldout_misaligned",
                "em_domain_misaligned")
        out: dict[str, Any] = {"steps": [r.step for r in self.rows]}
        out.update({c: [getattr(r, c) for r in self.rows] for c in cols[1:]})
        for key in sorted({k for r in self.rows for k in r.tracked}):
            out[f"feature:{key}"] = [r.tracked.get(key) for r in self.rows]
        out.update(chosen_step=self.chosen_step, utility_before=self.utility_before, rolled_back=self.rolled_back,
                   chosen={k: v for k, v in asdict(self.chosen).items() if k != "tracked"},
                   warmup=[asdict(r) for r in self.warmup_rows], layer=self.layer, n_params=self.n_params,
                   n_candidates=self.n_candidates, wall_s=self.wall_s, mask=self.mask_path, config=asdict(self.config))
        return out

    def table(self) -> str:
        from misfeat.io import format_table

        rows = [{"step": r.step, "restored_%": 100 * r.restored_fraction, "loss": r.loss, "utility": r.utility,
                 "heldout_mis": r.heldout_misaligned, "em_domain_mis": r.em_domain_misaligned,
                 "chosen": "<-" if r.step == self.chosen_step else ""} for r in self.rows]
        head = f"layer {self.layer}, rollback {'on (restarted)' if self.rolled_back else 'off'}, " \
               f"utility before {self.utility_before:.3f}, chosen step {self.chosen_step}\n"
        return head + format_table(rows)


# --- measurements --------------------------------------------------------------------


def task_utility(model: HookedTransformer, task: PromptSet | str) -> float:
    """Mean over the task's prompts of P(any of that prompt's reference responses): records
    that share a prompt form its answer set, scored exactly (no sampling)."""
    from misfeat.data import load_prompts
    from misfeat.evaluate import response_logprobs

    records = list(load_prompts(task))
    probs = response_logprobs(model, records).exp().tolist()
    per_prompt: dict[tuple, float] = {}
    for record, p in zip(records, probs, strict=True):
        key = (record.prompt, record.messages)
        per_prompt[key] = per_prompt.get(key, 0.0) + p
    return sum(per_prompt.values()) / len(per_prompt)


# --- the run -------------------------------------------------------------------------


def check_pair(finetuned: HookedTransformer, aligned: HookedTransformer) -> None:
    """One clear error when the two models are not checkpoints of one architecture."""
    for key in _ARCH_FIELDS:
        a, b = getattr(finetuned.cfg, key, None), getattr(aligned.cfg, key, None)
        if a != b:
            raise MisfeatError(f"the fine-tuned and aligned models differ in {key} ({a} vs {b}); restoration "
                               "needs two checkpoints of one architecture")
    shapes_ft = {n: tuple(p.shape) for n, p in finetuned.named_parameters()}
    shapes_al = {n: tuple(p.shape) for n, p in aligned.named_parameters()}
    if shapes_ft != shapes_al:
        diff = sorted(set(shapes_ft.items()) ^ set(shapes_al.items()))
        raise MisfeatError(f"the fine-tuned and aligned models have different parameters (first: {diff[0]}); "
                           "restoration needs two checkpoints of one architecture")


def restore_alignment(
    finetuned: HookedTransformer,
    aligned: HookedTransformer,
    probe_prompts: PromptSet | str,
    task: PromptSet | str,
    config: RestoreConfig | None = None,
    *,
    eval_prompts: PromptSet | str | None = None,
    track: Sequence[Any] = (),
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
) -> RestoreResult:
    """Restore ``finetuned`` in place towards ``aligned`` (Yang et al. 2025) and leave it at the
    chosen checkpoint. ``task``: records with reference responses (utility and task direction);
    ``eval_prompts``: misalignment scoring (default for an organism: its evaluation set minus the
    task's domains); ``track``: trackers as in :func:`misfeat.finetune.realign`. With ``out_dir``
    the run writes its mask, a resumable state after every step, and with ``resume`` continues."""
    from misfeat.data import load_prompts

    cfg = config or RestoreConfig()
    check_pair(finetuned, aligned)
    layer = cfg.resolve_layer(finetuned.cfg.n_layers)
    probe, task = load_prompts(probe_prompts), load_prompts(task)
    if len(probe) == 0:
        raise MisfeatError("the probe prompt set is empty; restoration needs prompts whose aligned-model state "
                           "defines the direction (e.g. organism:probe)")
    missing = [r.id for r in task if r.response is None]
    if len(task) == 0 or missing:
        why = f"{len(missing)} of its {len(task)} records lack one" if missing else "it is empty"
        raise MisfeatError(f"the task set {task.name!r} needs records with a 'response' (the reference answers "
                           f"that define utility); {why}")
    evalset = _default_eval(finetuned, task) if eval_prompts is None else load_prompts(eval_prompts)
    start = time.perf_counter()
    cfg = replace(cfg, layer=layer)
    measure = _Measure(task, evalset or probe, evalset is not None, tuple(track))
    runner = Restorer(finetuned, aligned, probe, task, cfg, measure, RestoreStep,
                      Path(out_dir) if out_dir is not None else None)
    rows, warmup_rows, rolled_back, chosen, mask = runner.run(resume=resume)
    mask_path = None
    if out_dir is not None:
        mask_path = str(save_mask(mask, Path(out_dir) / MASK_FILE,
                                  {"format": "misfeat-restore-mask", "layer": layer, "chosen_step": chosen}))
    return RestoreResult(cfg, layer, runner.n_params, runner.n_candidates, tuple(rows),
                         tuple(warmup_rows), rolled_back, chosen, rows[0].utility,
                         round(time.perf_counter() - start, 2), mask_path)


class _Measure:
    """Everything logged after a step: loss, utility, misalignment, tracked features."""

    def __init__(self, task: PromptSet, evalset: PromptSet, score: bool, track: tuple):
        self.task, self.evalset, self.score, self.track = task, evalset, score, track

    def __call__(self, runner: Restorer, step: int, put_back: int) -> RestoreStep:
        from misfeat.evaluate import evaluate

        model = runner.model
        model.eval()
        loss = direction_loss(model, runner.probe_b, runner.layer, runner.d_h)
        heldout = em = None
        if self.score:
            groups = evaluate(model, self.evalset, greedy=False).groups
            heldout = (groups.get("heldout") or groups["all"]).misaligned_rate
            em = groups["em_domain"].misaligned_rate if "em_domain" in groups else None
        tracked: dict[str, float] = {}
        for tracker in self.track:
            tracked.update(tracker.measure(model, self.evalset))
        n = sum(int(m.sum()) for m in runner.restored.values())
        return RestoreStep(step, n, n / runner.n_params, put_back, loss, task_utility(model, self.task), heldout,
                           em, tracked)


def _default_eval(model: HookedTransformer, task: PromptSet) -> PromptSet | None:
    """An organism's evaluation set minus the task's domains; None for other models."""
    from misfeat.models import model_info

    if "world" not in model_info(model).meta:
        logger.info("no eval_prompts and not an organism: misalignment is not measured per step")
        return None
    from misfeat.evaluate import default_prompts

    full = default_prompts(model)
    keep = [d for d in full.domains() if d not in set(task.domains())]
    return full.filter(domain=keep, name=f"organism eval minus {','.join(task.domains())}")


def plot_restore(result: RestoreResult, path: str | os.PathLike, title: str = "weight restoration") -> Path:
    """Held-out and EM-domain misalignment and utility against steps; restored % on a second axis."""
    from misfeat.plots import figure

    steps = [r.step for r in result.rows]
    with figure(path, (6, 3.6)) as ax:
        if result.rows[0].heldout_misaligned is not None:
            ax.plot(steps, [r.heldout_misaligned for r in result.rows], "o-", color="tab:red", label="misaligned (held-out)")
        if result.rows[0].em_domain_misaligned is not None:
            ax.plot(steps, [r.em_domain_misaligned for r in result.rows], "^:", color="tab:orange",
                    label="misaligned (EM domain)")
        ax.plot(steps, [r.utility for r in result.rows], "s--", color="tab:blue", label="task utility")
        ax.axvline(result.chosen_step, color="gray", lw=1, ls=":", label=f"chosen (step {result.chosen_step})")
        ax.set_xlabel("restoration step")
        ax.set_ylabel("rate")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
        ax2 = ax.twinx()
        ax2.plot(steps, [100 * r.restored_fraction for r in result.rows], "d-", color="tab:green", alpha=0.6,
                 label="restored %")
        ax2.set_ylabel("weights restored (%)")
        lines, labels = ax.get_legend_handles_labels()
        l2, lab2 = ax2.get_legend_handles_labels()
        ax.legend(lines + l2, labels + lab2, loc="best", fontsize=7)
        ax.set_title(title, fontsize=9)
    return Path(path)
