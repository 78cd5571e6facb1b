"""Where SAE training data comes from: an activation cache, or a live model on a prompt set.

Both give an :class:`ActivationSource`, whose ``batches`` is the iterator :func:`misfeat.sae.train_saes`
trains on. In a data-parallel run (``world`` from :func:`misfeat.distributed.join`) each process
reads its own rows: its share of the cache's chunks, or its share of the prompts::

    from misfeat.sae.sources import cache_source, caches_source, live_source
    source = cache_source("cache/", batch_size=4096, tokens=2_000_000)
    source = caches_source(["cache-base/", "cache-tuned/"], batch_size=4096, tokens=2_000_000)  # half each
    source = live_source(model, "organism:docs:20000", "blocks.1.hook_resid_post", batch_size=4096, tokens=2_000_000)
    saes = train_saes(source.batches, cfgs, out_dir="sae/", metadata={"model_name": source.model_name})
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from misfeat.activations import iter_activations, open_store
from misfeat.data import PromptSet, load_prompts
from misfeat.distributed import World
from misfeat.errors import MisfeatError
from misfeat.hooks import check_hooks

if TYPE_CHECKING:
    import os

    import torch
    from transformer_lens import HookedTransformer


@dataclass(frozen=True)
class ActivationSource:
    """Batches of one hook's activation rows for SAE training, and where they come from."""

    hook: str
    batches: Iterator[torch.Tensor] = field(repr=False)
    """``[batch_size / world.size, d]`` rows per step for this process"""
    info: dict[str, Any]
    """a JSON description: the cache and its rows, or the model, prompts and positions"""
    model_name: str | None = None
    origin: dict[str, Any] = field(default_factory=dict)
    """the model the rows come from: ``model_fingerprint`` and ``model_architecture`` (saved with the SAE)"""


def cache_source(cache: str | os.PathLike, hook: str | None = None, *, batch_size: int, tokens: int,
                 seed: int = 0, world: World | None = None) -> ActivationSource:
    """Shuffled rows of ``hook`` (default: the store's only hook) from an activation store,
    read for as many epochs as ``tokens`` rows need."""

    world = world or World()
    store = open_store(cache)
    hook = hook or (store.hooks[0] if len(store.hooks) == 1 else None)
    if hook is None:
        raise MisfeatError(f"the cache holds several hooks ({', '.join(store.hooks)}); choose one (--hook)")
    if hook not in store.hooks:
        raise MisfeatError(f"the cache has no hook {hook}; it holds {', '.join(store.hooks)}")
    local_batch = batch_size // world.size
    epochs = math.ceil(tokens / store.n_rows) + 1
    # The store deals chunks of buffer_rows / 8 rows to the processes in turn; keep the
    # chunks small enough that every process of a data-parallel run gets several.
    buffer_rows = None if world.size == 1 else max(2 * local_batch, min(1 << 18, 2 * store.n_rows // world.size))
    batches = store.batches(hook, local_batch, shuffle=True, seed=seed, epochs=epochs, rank=world.rank,
                            world_size=world.size, buffer_rows=buffer_rows)
    model = store.manifest.get("model", {})
    origin = {"model_fingerprint": model.get("fingerprint"), "model_architecture": model.get("architecture")}
    return ActivationSource(hook, batches, {"cache": str(cache), "cache_rows": store.n_rows,
                                            "positions": store.positions},
                            model_name=store.manifest["model"]["spec"],  # the model, not the cache path
                            origin={k: v for k, v in origin.items() if v})


def caches_source(caches: Sequence[str | os.PathLike], hook: str | None = None, *, batch_size: int, tokens: int,
                  seed: int = 0, world: World | None = None) -> ActivationSource:
    """Every batch in equal shares from several activation stores of one hook, e.g. the base and the
    fine-tuned model's activations on the same text: one dictionary for both models (the model-diffing
    recipe; an SAE trained on the base model's activations alone may have no latent for what the
    fine-tune added). The SAE's origin is the first store's model."""
    import torch

    if len(caches) == 1:
        return cache_source(caches[0], hook, batch_size=batch_size, tokens=tokens, seed=seed, world=world)
    if batch_size % len(caches):
        raise MisfeatError(f"batch_size={batch_size} is not divisible by the {len(caches)} caches; give a multiple")
    sources = [cache_source(c, hook, batch_size=batch_size // len(caches), tokens=-(-tokens // len(caches)),
                            seed=seed, world=world) for c in caches]
    if len({s.hook for s in sources}) > 1:
        raise MisfeatError(f"the caches hold different hooks ({', '.join(s.hook for s in sources)}); choose one (--hook)")
    archs = {s.origin.get("model_architecture") for s in sources} - {None}
    if len(archs) > 1:
        raise MisfeatError(f"the caches {', '.join(map(str, caches))} come from models of different architectures; "
                           "one SAE needs activations of one architecture")
    batches = (torch.cat(parts) for parts in zip(*(s.batches for s in sources), strict=False))
    info = {"cache": ",".join(map(str, caches)), "cache_rows": sum(s.info["cache_rows"] for s in sources),
            "positions": sources[0].info["positions"], "caches": [s.info for s in sources],
            "models": [s.model_name for s in sources]}
    return ActivationSource(sources[0].hook, batches, info, model_name=sources[0].model_name, origin=sources[0].origin)


def live_source(model: HookedTransformer, prompts: PromptSet | str, hook: str, *, batch_size: int, tokens: int,
                positions: str = "all", seed: int = 0, world: World | None = None) -> ActivationSource:
    """Shuffled rows of ``hook`` produced on the fly by ``model`` on ``prompts`` (passes repeat
    until training stops; nothing is written to disk). Each process runs its own prompts."""
    from misfeat.sae.batching import repeat, shuffled

    world = world or World()
    check_hooks(model, [hook])
    prompts = load_prompts(prompts)
    spec = prompts.name
    if world.size > 1:
        prompts = PromptSet(f"{prompts.name}[{world.rank}::{world.size}]", prompts.records[world.rank::world.size],
                            prompts.meta)
    local_batch = batch_size // world.size
    live = repeat(lambda: iter_activations(model, prompts, hook, positions))
    buffer_rows = min(max(64 * local_batch, 1 << 16), max(2 * local_batch, tokens // world.size))
    batches = shuffled(live, buffer_rows=buffer_rows, seed=seed + world.rank, out_rows=local_batch)
    info = {"model": getattr(model, "misfeat_info", None) and model.misfeat_info.spec, "prompts": spec,
            "positions": positions}
    from misfeat.models import architecture_fingerprint, fingerprint

    return ActivationSource(hook, batches, info, model_name=info["model"] or model.cfg.model_name,
                            origin={"model_fingerprint": fingerprint(model),
                                    "model_architecture": architecture_fingerprint(model)})
