"""misfeat.distributed (torchrun's environment, read in one place) and the SAE activation sources."""

import pytest
import torch

from misfeat.data import PromptRecord, PromptSet
from misfeat.distributed import Env, World, env, join, rank_device
from misfeat.errors import MisfeatError

HOOK = "blocks.0.hook_resid_post"


def test_env_reads_torchrun_variables(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert env() == Env(0, 1, 0) and join("cpu") == (World(), "cpu") and rank_device(None) is None
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert env() == Env(3, 4, 1)
    assert rank_device("cpu") == "cpu"
    assert rank_device(None) == ("cuda:1" if torch.cuda.is_available() else None)
    monkeypatch.setenv("WORLD_SIZE", "four")
    with pytest.raises(MisfeatError, match="must be integers"):
        env()


def test_a_world_of_one_reduces_to_itself():
    world = World()
    flags = torch.tensor([True, False])
    assert world.is_main and not world.active and world.world_size == 1
    assert world.any(flags) is flags and world.any_true(True) and not world.any_true(False)
    assert world.min(None) is None


def test_live_source_gives_rows_of_the_hook(tiny_model):
    from misfeat.sae.sources import live_source

    prompts = PromptSet("p", tuple(PromptRecord(f"q{i}", prompt=q) for i, q in enumerate(["fix my car", "fever"])))
    source = live_source(tiny_model, prompts, HOOK, batch_size=4, tokens=8, seed=0)
    batch = next(iter(source.batches))
    assert source.hook == HOOK and batch.shape == (4, tiny_model.cfg.d_model) and source.info["positions"] == "all"
    with pytest.raises(MisfeatError, match="blocks.9"):
        live_source(tiny_model, prompts, "blocks.9.hook_resid_post", batch_size=4, tokens=8)


def test_cache_source_needs_a_hook_the_store_has(tiny_model, tmp_path):
    from misfeat.activations import cache_activations
    from misfeat.sae.sources import cache_source

    prompts = PromptSet("p", tuple(PromptRecord(f"q{i}", prompt=q) for i, q in enumerate(["fix my car", "fever"])))
    cache_activations(tiny_model, prompts, [HOOK, "blocks.1.hook_resid_post"], tmp_path / "c", positions="all")
    with pytest.raises(MisfeatError, match="several hooks"):
        cache_source(tmp_path / "c", batch_size=4, tokens=8)
    source = cache_source(tmp_path / "c", HOOK, batch_size=4, tokens=8)
    assert next(iter(source.batches)).shape == (4, tiny_model.cfg.d_model) and source.info["cache_rows"] > 4
