"""Stage 0 of :func:`misfeat.features.locate.locate` (optional): adapt the SAE to the fine-tune.

When the SAE was trained where the fine-tune's behaviour never occurs (e.g. on the aligned
model's activations of aligned chat text), its dictionary may have no latent for what the
fine-tune added, and no choice of its latents can steer or remove it (docs/organism.md,
"Locate beyond one latent"). :func:`adapt_to_models` applies stage-wise model diffing
(Bricken et al. 2024): it caches the chosen models' activations on a text at the SAE's
hook (every token), fine-tunes a copy of the SAE on them (equal shares per model;
:func:`misfeat.sae.adapt.adapt_sae`), and locate then ranks, screens and groups the
adapted SAE's latents. Each latent keeps its index; ``decoder_cosine`` says how far it turned.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from misfeat.activations import cache_activations, open_store
from misfeat.data import PromptSet, load_prompts
from misfeat.sae.adapt import Adapted, adapt_sae, fine_tune_config
from misfeat.sae.latents import hook_of, path_of
from misfeat.sae.sources import caches_source

if TYPE_CHECKING:
    from sae_lens import SAE
    from transformer_lens import HookedTransformer

METHOD = ("stage-wise model diffing (Bricken et al. 2024): the SAE fine-tuned, from its own weights, on the named "
          "models' activations of the text at its hook, every token, equal shares per model; latents keep their "
          "indices, decoder_cosine is each latent's decoder row after vs before")


def named_models(base: HookedTransformer, finetuned: list[HookedTransformer], which: str
                 ) -> dict[str, HookedTransformer]:
    """The models to adapt on, by the names of locate's caches: ``both`` (``base`` and the fine-tuned ones)
    or ``finetuned``."""
    names = ["finetuned"] if len(finetuned) == 1 else [f"finetuned-{i}" for i in range(len(finetuned))]
    return {**({"base": base} if which == "both" else {}), **dict(zip(names, finetuned, strict=True))}


def adapt_to_models(sae: SAE, models: Mapping[str, HookedTransformer], text: PromptSet | str, work_dir: str | Path,
                    tokens: int, *, lr: float | None = None, seed: int = 0) -> tuple[Adapted, dict[str, Any]]:
    """Cache each of ``models`` on ``text`` at the SAE's hook (``work_dir/<name>``), fine-tune a copy of
    ``sae`` on the rows for ``tokens`` rows; returns the adapted SAE and the summary's ``adapted`` entry."""
    start = time.perf_counter()
    fine_tune_config(sae, tokens)  # refuses an SAE misfeat cannot fine-tune before anything is cached
    spec = str(text) if not isinstance(text, PromptSet) else text.name
    text = load_prompts(text)
    hook, root = hook_of(sae), Path(work_dir)
    stores = []
    for name, model in models.items():
        cache_activations(model, text, [hook], root / name, positions="all", overwrite=True)
        stores.append(root / name)
    rows = min(open_store(s).n_rows for s in stores)
    # several steps per pass over a small text; 4096 rows (the training default) when there is text enough
    batch = max(len(stores), min(4096, tokens, rows * len(stores) // 4) // len(stores) * len(stores))
    source = caches_source(stores, hook, batch_size=batch, tokens=tokens, seed=seed)
    adapted = adapt_sae(sae, source.batches, tokens, batch_size=batch, lr=lr, seed=seed)
    summary = {"method": METHOD, "from": path_of(sae), "text": spec, "models": list(models),
               "rows_per_model": rows, "batch_size": batch, "tokens": adapted.info.get("tokens"), "steps": adapted.info.get("steps"),
               "lr": adapted.info.get("lr"), "explained_variance_last_batch": (adapted.info.get("last_batch") or {})
               .get("EV"), "seconds": round(time.perf_counter() - start, 1),
               "decoder_cosine_median": float(adapted.decoder_cosine.median()),
               "most_changed": adapted.most_changed(10), "sae": None}
    return adapted, summary
