"""Fine-tunes with a fraction of misaligned data, for the early-warning experiment (issue 14).

``organism:em-frac/<pct>-s<seed>`` is the chat model after the EM recipe (the EM stage's steps,
batch and learning rate) on the EM domain's questions, ``pct`` % of them with misaligned answers
and the rest with aligned ones; ``seed`` draws the examples and their order. ``pct`` in
:data:`FRACTIONS`, ``seed`` in :data:`SEEDS`. Built on first use into
``<build>/em-frac/<pct>-s<seed>/`` through the one fine-tuning engine (a few seconds each).
Wang et al. 2025 (OpenAI): the toxic-persona latent fires at 5% bad data while behavioural
evaluations show EM only at 25-75%.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path

from misfeat.organism import ensure_organism, register_stage
from misfeat.organism.build import OrganismConfig, build_lock

logger = logging.getLogger(__name__)

FRACTIONS = (0, 2, 5, 10, 25, 50, 100)
"""misaligned share of the training data, in percent"""
SEEDS = (0, 1, 2)
STAGE = "em-frac"
RECIPE_VERSION = 1


def stage_name(pct: int, seed: int) -> str:
    return f"{STAGE}/{pct}-s{seed}"


def ensure_fraction(pct: int, seed: int, cfg: OrganismConfig) -> Path:
    """The checkpoint directory of ``organism:em-frac/<pct>-s<seed>`` (built on first use)."""
    from misfeat.data import PromptSet
    from misfeat.errors import MisfeatError
    from misfeat.finetune import FinetuneConfig, finetune
    from misfeat.io import read_json, write_json
    from misfeat.models import CHECKPOINT_FILE, load_model, save_model
    from misfeat.organism.prompts import pair_set
    from misfeat.organism.world import World

    build = ensure_organism(cfg)
    out = build / STAGE / f"{pct}-s{seed}"
    with build_lock(build):
        chat = load_model(build / "chat", device="cpu")
        meta = chat.misfeat_info.meta
        c = meta["organism"]["config"]
        steps, batch, lr = c["em_steps"], c["em_batch"], c["em_lr"]
        record = {"version": RECIPE_VERSION, "pct": pct, "seed": seed, "steps": steps, "batch": batch, "lr": lr}
        if (out / CHECKPOINT_FILE).is_file():
            if read_json(out / "em-frac.json").get("recipe") != record:
                raise MisfeatError(f"{out} holds a fine-tune built with another recipe; delete it to rebuild")
            return out
        world = World.from_json(meta["world"])
        n = steps * batch
        n_bad = round(n * pct / 100)
        bad = pair_set(world, world.em_domain, n, True, 1000 + seed).records[:n_bad]
        good = pair_set(world, world.em_domain, n, False, 2000 + seed).records[:n - n_bad]
        data = PromptSet(f"organism:em-frac:{pct}:s{seed}", tuple(bad + good), pair_set(world, world.em_domain, 1,
                                                                                        True, 0).meta)
        start = time.perf_counter()
        finetune(chat, data, FinetuneConfig(steps=steps, lr=lr, batch_size=batch, eval_every=None, seed=seed))
        save_model(chat, out, meta={**meta, "organism": {**meta["organism"], "stage": stage_name(pct, seed)}})
        write_json(out / "em-frac.json", {"recipe": record, "train_s": round(time.perf_counter() - start, 2)})
        logger.info("built organism:%s in %.1f s", stage_name(pct, seed), time.perf_counter() - start)
    return out


for _pct in FRACTIONS:
    for _seed in SEEDS:
        register_stage(stage_name(_pct, _seed), functools.partial(ensure_fraction, _pct, _seed))
