"""Build the organism: pre-train, chat-tune, EM and control fine-tunes, with evaluations.

Stages (each a misfeat checkpoint under the build directory)::

    pretrain/   characters answering questions, kind and cruel personas
    chat/       pretrain + chat tuning (assistant, aligned answers, all domains)
    em/         chat + narrow EM fine-tune (assistant, misaligned answers, one domain)
    control/    chat + the same questions with aligned answers
    em-steps/step-NNNN/   the EM fine-tune every few steps (step-0000 is chat)
    summary.json          each stage's evaluation and the EM curve

Deterministic for a seed: every stage draws from its own seeded generators, so a build
interrupted after a stage resumes at the next one and gives the same checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import random
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from misfeat.checkpoints import list_checkpoints
from misfeat.errors import MisfeatError
from misfeat.evaluate import evaluate
from misfeat.finetune import lr_schedule, masked_lm_loss, pad_examples
from misfeat.io import SUMMARY_FILE, progress, read_json, write_json
from misfeat.models import CHECKPOINT_FILE, load_model, save_model
from misfeat.organism.corpus import Corpus, Example, PersonaMix
from misfeat.organism.world import DOMAINS, World, make_world, save_tokenizer

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

logger = logging.getLogger(__name__)

# Bump when the recipe or the world changes, so cached organisms are rebuilt.
BUILD_VERSION = 1
STAGES = ("pretrain", "chat", "em", "control")


@dataclass(frozen=True)
class OrganismConfig:
    """Everything that determines an organism build (its hash keys the build cache)."""

    preset: str = "default"
    seed: int = 0
    em_domain: str = "health"
    n_layers: int = 3
    d_model: int = 128
    n_heads: int = 4
    d_mlp: int = 512
    n_ctx: int = 128
    pretrain_steps: int = 600
    pretrain_batch: int = 32
    pretrain_lr: float = 2e-3
    chat_steps: int = 150
    chat_batch: int = 32
    chat_lr: float = 1e-4
    em_steps: int = 30
    em_batch: int = 16
    em_lr: float = 3e-4
    em_checkpoint_every: int = 2
    mix: PersonaMix = field(default_factory=PersonaMix)

    def __post_init__(self) -> None:
        if self.em_domain not in DOMAINS:
            raise MisfeatError(f"unknown EM domain {self.em_domain!r}; choose one of {', '.join(DOMAINS)}")
        if self.preset not in PRESETS:
            raise MisfeatError(f"unknown organism preset {self.preset!r}; choose one of {', '.join(PRESETS)}")

    @property
    def key(self) -> str:
        blob = json.dumps({"version": BUILD_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]

    @property
    def base_key(self) -> str:
        """Key of the stages that do not depend on the EM domain (pretrain, chat)."""
        blob = json.dumps({"version": BUILD_VERSION, **asdict(self), "em_domain": None}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]

    @property
    def dirname(self) -> str:
        return f"{self.preset}-seed{self.seed}-{self.em_domain}-{self.key}"

    @classmethod
    def from_preset(cls, preset: str = "default", **overrides: Any) -> OrganismConfig:
        if preset not in PRESETS:
            raise MisfeatError(f"unknown organism preset {preset!r}; choose one of {', '.join(PRESETS)}")
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise MisfeatError(f"unknown organism option(s) {', '.join(sorted(unknown))}")
        return cls(preset=preset, **{**PRESETS[preset], **overrides})


PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    # a faster organism for tests and quick iteration: same world, smaller and shorter
    "small": {"n_layers": 2, "pretrain_steps": 400},
    # one factor at a time for the elasticity trend (size, pre-training data), docs/dynamics.md
    "shallow": {"n_layers": 2},
    "short": {"pretrain_steps": 300},
}


@contextlib.contextmanager
def build_lock(out: Path) -> Iterator[None]:
    """An exclusive lock on a build directory, so two processes never build into it at once."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def is_complete(out: Path) -> bool:
    return (out / SUMMARY_FILE).is_file()


def build_organism(cfg: OrganismConfig, out: str | Path, *, force: bool = False) -> Path:
    """Build every stage of the organism into ``out`` (resuming finished stages) and evaluate them."""
    out = Path(out)
    with build_lock(out):
        if force:
            for stage in (*STAGES, "em-steps"):
                shutil.rmtree(out / stage, ignore_errors=True)
            (out / "build.json").unlink(missing_ok=True)
            (out / SUMMARY_FILE).unlink(missing_ok=True)
        _check_config(out, cfg)
        if is_complete(out):
            logger.info("organism already built in %s", out)
            return out
        builder = _Builder(cfg, out)
        timings = builder.run()
        summary = builder.evaluate_all()
        summary["timings_s"] = timings
        write_json(out / SUMMARY_FILE, summary)
        logger.info("organism built in %s (%.0f s)", out, sum(timings.values()))
    return out


def _check_config(out: Path, cfg: OrganismConfig) -> None:
    path = out / "build.json"
    record = {"version": BUILD_VERSION, "key": cfg.key, "base_key": cfg.base_key, "config": asdict(cfg)}
    if path.is_file():
        old = read_json(path)
        if old.get("key") != cfg.key:
            raise MisfeatError(f"{out} holds an organism built with another config (key {old.get('key')}, "
                               f"now {cfg.key}); use another --out or --force to rebuild")
    else:
        write_json(path, record)


class _Builder:
    def __init__(self, cfg: OrganismConfig, out: Path):
        self.cfg, self.out = cfg, out
        self.world: World = make_world(cfg.em_domain)
        self.tok_dir = out / "tokenizer"
        self.tokenizer = save_tokenizer(self.world, self.tok_dir)
        self.vocab = {w: i for i, w in enumerate(self.world.vocabulary())}
        self.corpus = Corpus.create(self.world, self.vocab, cfg.mix, cfg.seed, max_words=cfg.n_ctx - 8)

    def meta(self, stage: str, step: int | None = None) -> dict[str, Any]:
        return {
            "chat_format": "organism",
            "domains": list(self.world.domain_names),
            "em_domain": self.world.em_domain,
            "vocabulary": self.world.vocabulary(),
            "world": self.world.to_json(),
            "organism": {"stage": stage, "step": step, "key": self.cfg.key, "config": asdict(self.cfg),
                         "villains": sorted(self.corpus.villains)},
        }

    def new_model(self) -> HookedTransformer:
        import torch
        from transformer_lens import HookedTransformer, HookedTransformerConfig

        c = self.cfg
        torch.manual_seed(c.seed)
        tl_cfg = HookedTransformerConfig(
            n_layers=c.n_layers, d_model=c.d_model, n_heads=c.n_heads, d_head=c.d_model // c.n_heads,
            d_mlp=c.d_mlp, n_ctx=c.n_ctx, d_vocab=len(self.vocab), act_fn="gelu", normalization_type="LN",
            positional_embedding_type="standard", device="cpu", seed=c.seed, default_prepend_bos=True,
            model_name="misfeat-organism",
        )
        return HookedTransformer(tl_cfg, tokenizer=self.tokenizer)

    def load(self, stage: str) -> HookedTransformer:

        return load_model(self.out / stage, device="cpu")

    def save(self, model: HookedTransformer, rel: str, stage: str, step: int | None = None) -> None:

        save_model(model, self.out / rel, meta=self.meta(stage, step))

    def done(self, rel: str) -> bool:

        return (self.out / rel / CHECKPOINT_FILE).is_file()

    def reuse_from_sibling(self, stage: str) -> None:
        """Copy ``stage`` from a finished build beside this one that differs only in the EM domain
        (pretrain and chat do not depend on it), instead of training it again."""
        for other in sorted(self.out.parent.glob("*/build.json")):
            donor = other.parent
            if donor == self.out or not (donor / stage / "misfeat_model.json").is_file():
                continue
            try:
                if read_json(other).get("base_key") != self.cfg.base_key:
                    continue
            except (OSError, ValueError):
                continue

            model = load_model(donor / stage, device="cpu")
            self.save(model, stage, stage)  # re-saved with this build's metadata (its EM domain)
            logger.info("organism stage %s reused from %s (same config but the EM domain)", stage, donor)
            return

    def train(self, model: HookedTransformer, draw: Callable[[random.Random], Example], *, steps: int,
              batch: int, lr: float, warmup: int, final_fraction: float, seed: str, desc: str,
              on_step: Callable[[int], None] | None = None) -> None:
        import torch


        rng = random.Random(f"{seed}-{self.cfg.seed}")
        torch.manual_seed(self.cfg.seed)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
        bar = progress(range(steps), desc=desc, total=steps)
        for step in bar:
            for group in opt.param_groups:
                group["lr"] = lr_schedule(step, steps, lr, warmup, final_fraction)
            tokens, mask = pad_examples([draw(rng) for _ in range(batch)], self.vocab["<pad>"])
            loss = masked_lm_loss(model, tokens, mask)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if step % 10 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
            if on_step is not None:
                on_step(step + 1)
        model.eval()

    def run(self) -> dict[str, float]:
        c, timings = self.cfg, {}
        stage_specs = {
            "pretrain": dict(draw=self.corpus.pretrain_example, steps=c.pretrain_steps, batch=c.pretrain_batch,
                             lr=c.pretrain_lr, warmup=30, final_fraction=0.1),
            "chat": dict(draw=self.corpus.chat_example, steps=c.chat_steps, batch=c.chat_batch, lr=c.chat_lr,
                         warmup=10, final_fraction=0.1),
            "em": dict(draw=lambda rng: self.corpus.finetune_example(rng, c.em_domain, True), steps=c.em_steps,
                       batch=c.em_batch, lr=c.em_lr, warmup=0, final_fraction=1.0),
            "control": dict(draw=lambda rng: self.corpus.finetune_example(rng, c.em_domain, False),
                            steps=c.em_steps, batch=c.em_batch, lr=c.em_lr, warmup=0, final_fraction=1.0),
        }
        parents = {"chat": "pretrain", "em": "chat", "control": "chat"}
        for stage in STAGES:
            if stage in ("pretrain", "chat") and not self.done(stage):
                self.reuse_from_sibling(stage)
            if self.done(stage):
                continue
            start = time.perf_counter()
            model = self.load(parents[stage]) if stage in parents else self.new_model()
            on_step = None
            if stage == "em":
                self.save(model, "em-steps/step-0000", "em", 0)

                def on_step(step: int, model: HookedTransformer = model) -> None:
                    if step % c.em_checkpoint_every == 0 or step == c.em_steps:
                        self.save(model, f"em-steps/step-{step:04d}", "em", step)

            self.train(model, seed=stage, desc=f"organism {stage}", on_step=on_step, **stage_specs[stage])
            self.save(model, stage, stage)
            timings[stage] = round(time.perf_counter() - start, 1)
            logger.info("organism stage %s done in %.0f s", stage, timings[stage])
        return timings

    def evaluate_all(self) -> dict[str, Any]:

        start = time.perf_counter()
        summary: dict[str, Any] = {"config": asdict(self.cfg), "key": self.cfg.key, "stages": {}}
        for stage in STAGES:
            summary["stages"][stage] = evaluate(self.load(stage)).summary()
        curve = []
        for path in list_checkpoints(self.out / "em-steps"):
            report = evaluate(self.load(f"em-steps/{path.name}"), greedy=False)
            curve.append({"step": int(path.name.split("-")[1]),
                          "heldout_misaligned": report["heldout"].misaligned_rate,
                          "heldout_valid": report["heldout"].valid_rate,
                          "heldout_logprob_gap": report["heldout"].logprob_gap,
                          "em_domain_misaligned": report["em_domain"].misaligned_rate})
        summary["em_curve"] = curve
        summary["eval_s"] = round(time.perf_counter() - start, 1)
        return summary
