"""The issue's bar on the organism's chat model (slow: caches ~650k rows and trains on 1M tokens).

Middle-layer residual (blocks.1.hook_resid_post of 3 blocks), d_sae = 8 x d_model = 1024,
k = 16, trained on pre-training-style documents and evaluated on held-out ones:
explained variance >= 0.9, dead latents <= 5%, CE loss recovered >= 0.9.
docs/benchmarks.md records the figures of scripts/bench_sae.py.
"""

from __future__ import annotations

import pytest

HOOK = "blocks.1.hook_resid_post"


@pytest.mark.slow
def test_bar_on_the_organism_chat_model(tmp_path):
    import math

    from misfeat.activations import cache_activations, open_store
    from misfeat.models import load_model
    from misfeat.sae import SAETrainConfig, evaluate_sae, train_sae

    model = load_model("organism:chat", device="cpu")
    assert model.cfg.n_layers == 3 and model.cfg.d_model == 128
    cache_activations(model, "organism:docs:8000", [HOOK], tmp_path / "train")
    cache_activations(model, "organism:docs:1500@seed=1", [HOOK], tmp_path / "eval")
    train = open_store(tmp_path / "train")
    cfg = SAETrainConfig(hook_name=HOOK, d_sae=8 * model.cfg.d_model, k=16, total_tokens=1_000_000, device="cpu")
    epochs = math.ceil(cfg.total_tokens / train.n_rows) + 1
    sae = train_sae(train.batches(HOOK, cfg.batch_size, epochs=epochs), cfg, out_dir=tmp_path / "sae")
    m = evaluate_sae(sae, open_store(tmp_path / "eval"), model, n_tokens=100_000, out_dir=tmp_path / "sae")
    print(m.table())
    assert m.n_tokens == 100_000 and m.l0 == pytest.approx(16, abs=0.5)
    assert m.explained_variance >= 0.9
    assert m.dead_fraction <= 0.05
    assert m.ce.ce_recovered >= 0.9
    assert 0 < m.ce.ce_increase < m.ce.ce_zero - m.ce.ce_clean
