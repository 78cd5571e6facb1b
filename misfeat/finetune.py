"""Fine-tuning with a response-only loss: the organism's training stages and re-alignment.

The loss and the optimiser schedule live here once; the organism build and
:func:`realign` (minimal fine-tuning that reverses emergent misalignment while tracking
behaviour and features per step) both call them. Sits at the end of the flow: it
consumes the directions and latents found by ``misfeat.features``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from misfeat.errors import MisfeatError

if TYPE_CHECKING:
    import torch
    from transformer_lens import HookedTransformer

    from misfeat.data import PromptSet


def pad_examples(examples: Sequence[tuple[Sequence[int], Sequence[bool]]], pad_id: int,
                 device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad ``(ids, loss_mask)`` examples into ``tokens [b, t]`` and ``loss_mask [b, t]``."""
    import torch

    width = max(len(ids) for ids, _ in examples)
    tokens = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.bool)
    for i, (ids, m) in enumerate(examples):
        tokens[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[i, : len(m)] = torch.tensor(m, dtype=torch.bool)
    return tokens.to(device), mask.to(device)


def masked_lm_loss(model: HookedTransformer, tokens: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the target positions ``loss_mask[:, 1:]``.

    ``loss_mask[b, t]`` marks token ``t`` as a target (predicted from tokens ``< t``);
    right padding needs no attention mask in a causal model.
    """
    import torch.nn.functional as F

    logits = model(tokens[:, :-1])
    target_mask = loss_mask[:, 1:]
    targets = tokens[:, 1:][target_mask]
    return F.cross_entropy(logits[target_mask].float(), targets)


def lr_schedule(step: int, total: int, peak: float, warmup: int = 0, final_fraction: float = 1.0) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``final_fraction * peak``."""
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    if final_fraction >= 1.0 or total <= warmup:
        return peak
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))


# --- re-alignment --------------------------------------------------------------------
#
# Wang et al. 2025 ("Persona features control emergent misalignment", sec. 5): about 35
# SFT steps on about 120 correct samples, even from another domain, took a misaligned
# model from 17.7% to ~0.1-0.5% misalignment. ``realign`` runs that experiment on any
# model and records, at every evaluation step, the behaviour and the tracked features.
#
# The seam for the next variants (KL to a reference, steering during training,
# interleaving): the loss is a sum of ``LossTerm``s, interventions can stay active in
# the training forward, and the data is any prompt set with responses.


class LossTerm(Protocol):
    """One additive term of the fine-tuning loss, computed on a batch."""

    name: str

    def __call__(self, model: HookedTransformer, batch: TrainBatch) -> torch.Tensor: ...


@dataclass(frozen=True)
class TrainBatch:
    """``tokens [b, t]`` right-padded; ``loss_mask [b, t]`` marks response tokens (the targets)."""

    tokens: torch.Tensor
    loss_mask: torch.Tensor


@dataclass(frozen=True)
class ResponseLoss:
    """Next-token cross-entropy on the response tokens only."""

    weight: float = 1.0
    name: str = "response_ce"

    def __call__(self, model, batch):
        return self.weight * masked_lm_loss(model, batch.tokens, batch.loss_mask)


@dataclass(frozen=True, eq=False)
class KLToReference:
    """KL(reference || model) of next-token distributions on the response positions
    (the KL defence of Kaczer et al. 2025; lambda 0.1 there)."""

    reference: Any
    weight: float = 0.1
    name: str = "kl_reference"

    def __call__(self, model, batch):
        import torch
        import torch.nn.functional as F

        mask = batch.loss_mask[:, 1:]
        logp = torch.log_softmax(model(batch.tokens[:, :-1])[mask].float(), -1)
        with torch.no_grad():
            ref = torch.log_softmax(self.reference(batch.tokens[:, :-1])[mask].float(), -1)
        return self.weight * F.kl_div(logp, ref, log_target=True, reduction="batchmean")


@dataclass(frozen=True)
class RealignConfig:
    """How to fine-tune (every field has a default that reproduces the paper's scale)."""

    steps: int = 35
    """optimiser steps"""
    lr: float = 3e-4
    """peak learning rate (AdamW)"""
    batch_size: int = 8
    """examples per step, drawn in shuffled epochs over the data"""
    params: str | tuple[str, ...] = "all"
    """which parameters train: all, mlp, attn, layers:0,2 (blocks), or parameter-name prefixes"""
    eval_every: int = 5
    """evaluate behaviour and tracked features every k steps (and at the first and last)"""
    checkpoint_every: int | None = None
    """save a misfeat checkpoint every k steps under out_dir/checkpoints/ (None: only the last)"""
    warmup: int = 0
    """linear warm-up steps"""
    weight_decay: float = 0.0
    seed: int = 0
    """data order seed; with it the run is deterministic"""

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.eval_every < 1:
            raise MisfeatError("steps, batch_size and eval_every must be positive")
        if not self.lr > 0:
            raise MisfeatError(f"lr must be positive, got {self.lr}")


def select_parameters(model: HookedTransformer, params: str | Sequence[str]) -> list[tuple[str, Any]]:
    """The named parameters ``params`` selects (see :class:`RealignConfig`); others are frozen.

    Parameters TransformerLens adds that the model's Hugging Face architecture lacks (the
    zero biases of Llama, Qwen2, Gemma ...) are never selected, so a fine-tuned model still
    exports to Hugging Face (see :func:`misfeat.hf.absent_in_hf`)."""
    from misfeat.hf import absent_in_hf

    absent = absent_in_hf(model)
    named = [(n, p) for n, p in model.named_parameters() if n not in absent]
    if params == "all":
        return named
    if params in ("mlp", "attn"):
        chosen = [(n, p) for n, p in named if f".{params}." in n]
    elif isinstance(params, str) and params.startswith("layers:"):
        try:
            layers = {int(x) for x in params.split(":", 1)[1].split(",") if x.strip()}
        except ValueError:
            raise MisfeatError(f"params {params!r}: expected layers:0,2") from None
        bad = [i for i in layers if not 0 <= i < model.cfg.n_layers]
        if bad:
            raise MisfeatError(f"params {params!r}: the model has blocks 0..{model.cfg.n_layers - 1}")
        chosen = [(n, p) for n, p in named if n.startswith("blocks.") and int(n.split(".")[1]) in layers]
    else:
        prefixes = (params,) if isinstance(params, str) else tuple(params)
        chosen = [(n, p) for n, p in named if n.startswith(prefixes)]
    if not chosen:
        raise MisfeatError(f"params {params!r} selects no parameter; use all, mlp, attn, layers:<i,j> or name "
                           f"prefixes such as {named[0][0]}")
    return chosen


class Tracker(Protocol):
    """Something measured on the model at every evaluation step: ``{name: value}``."""

    def measure(self, model: HookedTransformer, prompts: PromptSet) -> dict[str, float]: ...


@dataclass
class RealignResult:
    """Per-evaluation-step history (parallel lists) and per-step training loss."""

    history: dict[str, list[Any]]
    loss: list[float]
    checkpoints: list[str]
    eval_prompts: str

    def summary(self) -> dict[str, Any]:
        tracked = [k for k in self.history if k.startswith("feature:")]
        out: dict[str, Any] = dict(self.history)
        if tracked:
            out["feature_activation"] = self.history[tracked[0]]
        out.update(loss=self.loss, loss_steps=list(range(1, len(self.loss) + 1)), checkpoints=self.checkpoints,
                   eval_prompts=self.eval_prompts)
        return out

    def table(self) -> str:
        from misfeat.io import format_table

        keys = [k for k in self.history if k != "steps"]
        return format_table([{"step": s, **{k: self.history[k][i] for k in keys}}
                             for i, s in enumerate(self.history["steps"])])


def default_realign_eval(model: HookedTransformer, data: PromptSet) -> PromptSet:
    """For an organism: its held-out domains minus the domains of the training data."""
    from misfeat.evaluate import default_prompts

    full = default_prompts(model)
    em_domain = full.meta.get("em_domain")
    used = set(data.domains())
    keep = [d for d in full.domains() if d not in used]
    if not keep:
        raise MisfeatError("the training data covers every domain: give eval_prompts")
    name = f"organism eval minus {','.join(sorted(used))}" if used else full.name
    return full.filter(domain=keep, name=name) if em_domain else full


def realign(
    model: HookedTransformer,
    data: PromptSet | str,
    config: RealignConfig | None = None,
    *,
    eval_prompts: PromptSet | str | None = None,
    track: Sequence[Tracker] = (),
    losses: Sequence[LossTerm] | None = None,
    interventions: Sequence[Any] = (),
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
) -> RealignResult:
    """Fine-tune ``model`` in place on ``data`` (records with a ``response``; loss on the
    response tokens only), tracking behaviour and features every ``eval_every`` steps.

    ``losses`` default to :class:`ResponseLoss`; ``interventions`` stay applied during the
    training forward (e.g. preventative steering); checkpoints go to ``out_dir``, and with
    ``resume`` a run continues from its last checkpoint exactly as if uninterrupted.
    """
    import torch

    from misfeat.data import encode, load_prompts, pad_id_of
    from misfeat.evaluate import evaluate
    from misfeat.interventions import apply
    from misfeat.io import progress

    cfg = config or RealignConfig()
    data = load_prompts(data)
    missing = [r.id for r in data if r.response is None]
    if missing:
        raise MisfeatError(f"realign data needs a 'response' on every record; {len(missing)} lack one "
                           f"(first: {missing[0]!r})")
    evalset = load_prompts(eval_prompts) if eval_prompts is not None else default_realign_eval(model, data)
    emset = None
    from misfeat.models import model_info

    if evalset.meta.get("em_domain") and "world" in model_info(model).meta:
        # an organism: report its EM domain's own rate too
        from misfeat.evaluate import default_prompts

        emset = default_prompts(model).filter(domain=evalset.meta["em_domain"])
    losses = list(losses) if losses is not None else [ResponseLoss()]
    encoded = encode(data, model)
    examples = [(e.ids, [False] * e.n_prompt + [True] * (len(e) - e.n_prompt)) for e in encoded]
    order = _data_order(len(examples), cfg.steps * cfg.batch_size, cfg.seed)
    chosen = select_parameters(model, cfg.params)
    trainable = {id(p) for _, p in chosen}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    optimizer = torch.optim.AdamW([p for _, p in chosen], lr=cfg.lr, weight_decay=cfg.weight_decay)
    run = _RunDir(Path(out_dir)) if out_dir is not None else None
    history: dict[str, list[Any]] = {}
    loss_log: list[float] = []
    start = 0
    if resume and run is not None and run.latest() is not None:
        start, history, loss_log = run.restore(model, optimizer)
    checkpoints: list[str] = []

    def evaluate_now(step: int) -> None:
        model.eval()
        report = evaluate(model, evalset, greedy=False)
        head = report.groups["heldout"] if "heldout" in report.groups else next(iter(report.groups.values()))
        row: dict[str, Any] = {"steps": step, "misaligned_rate": head.misaligned_rate,
                               "valid_rate": head.valid_rate, "logprob_gap": head.logprob_gap}
        if emset is not None:
            row["em_domain_misaligned_rate"] = evaluate(model, emset, greedy=False).groups["em_domain"].misaligned_rate
        for tracker in track:
            row.update({f"feature:{k}": v for k, v in tracker.measure(model, evalset).items()})
        for key, value in row.items():
            history.setdefault(key, []).append(value)

    if start == 0:
        evaluate_now(0)
    pad = pad_id_of(model)
    bar = progress(range(start, cfg.steps), desc="realign", total=cfg.steps, initial=start, unit="step")
    for step in bar:
        model.train()
        idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
        tokens, mask = pad_examples([examples[i] for i in idx], pad, model.cfg.device)
        batch = TrainBatch(tokens, mask)
        for group in optimizer.param_groups:
            group["lr"] = lr_schedule(step, cfg.steps, cfg.lr, cfg.warmup)
        with apply(model, *interventions):
            loss = sum(term(model, batch) for term in losses)
        if not torch.isfinite(loss.detach()):
            raise MisfeatError(f"realign: the loss became {loss.item()} at step {step + 1}; lower the learning "
                               f"rate (now {cfg.lr})" + (f"; checkpoints so far are kept in {run.root}" if run else ""))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_log.append(loss.item())
        bar.set_postfix(loss=f"{loss_log[-1]:.3f}")
        done = step + 1
        if done % cfg.eval_every == 0 or done == cfg.steps:
            evaluate_now(done)
        if run is not None and ((cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == cfg.steps):
            checkpoints.append(run.save(model, optimizer, done, history, loss_log))
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return RealignResult(history, loss_log, checkpoints, evalset.name)


def _data_order(n: int, needed: int, seed: int) -> list[int]:
    """Shuffled epochs over ``n`` examples, concatenated until ``needed`` indices."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < needed:
        order += torch.randperm(n, generator=gen).tolist()
    return order[:needed]


class _RunDir:
    """Checkpoints of a realign run: ``checkpoints/step-NNNN/`` (a misfeat checkpoint plus
    ``trainer_state.pt`` with the optimiser state and the history so far)."""

    def __init__(self, root: Path):
        self.root = root

    def latest(self) -> Path | None:
        done = sorted(p for p in (self.root / "checkpoints").glob("step-*") if (p / "trainer_state.pt").is_file())
        return done[-1] if done else None

    def save(self, model, optimizer, step: int, history, loss_log) -> str:
        import torch

        from misfeat.models import save_model

        path = self.root / "checkpoints" / f"step-{step:04d}"
        save_model(model, path)
        tmp = path / "trainer_state.pt.tmp"
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "history": history, "loss": loss_log}, tmp)
        os.replace(tmp, path / "trainer_state.pt")
        return str(path)

    def restore(self, model, optimizer):
        import torch
        from safetensors.torch import load_file

        from misfeat.models import WEIGHTS_FILE

        path = self.latest()
        state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
        weights = load_file(str(path / WEIGHTS_FILE))
        model.load_state_dict({k: v.to(model.cfg.device) for k, v in weights.items()}, strict=False)
        optimizer.load_state_dict(state["optimizer"])
        return state["step"], state["history"], state["loss"]


def plot_realign(result: RealignResult, path: str | os.PathLike, title: str = "re-alignment") -> Path:
    """Misaligned rate (and EM-domain rate) against steps, with the tracked feature on a second axis."""
    from misfeat.plots import figure

    h = result.history
    with figure(path, (6, 3.6)) as ax:
        ax.plot(h["steps"], h["misaligned_rate"], "o-", color="tab:red", label="misaligned (held-out)")
        if "em_domain_misaligned_rate" in h:
            ax.plot(h["steps"], h["em_domain_misaligned_rate"], "^:", color="tab:orange", label="misaligned (EM domain)")
        ax.plot(h["steps"], h["valid_rate"], "s--", color="tab:blue", alpha=0.6, label="valid")
        ax.set_xlabel("fine-tuning step")
        ax.set_ylabel("rate")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
        features = [k for k in h if k.startswith("feature:")]
        lines, labels = ax.get_legend_handles_labels()
        if features:
            ax2 = ax.twinx()
            for key, color in zip(features, ("tab:green", "tab:purple", "tab:brown", "tab:gray"), strict=False):
                ax2.plot(h["steps"], h[key], "d-", color=color, label=key.removeprefix("feature:"))
            ax2.set_ylabel("feature")
            l2, lab2 = ax2.get_legend_handles_labels()
            lines, labels = lines + l2, labels + lab2
        ax.legend(lines, labels, loc="best", fontsize=7)
        ax.set_title(title, fontsize=9)
    return Path(path)
