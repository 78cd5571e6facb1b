"""The training loop: resume, sweeps from one read, divergence, live-model data, batching, config errors."""

from __future__ import annotations

import logging

import pytest

torch = pytest.importorskip("torch")

from misfeat.errors import MisfeatError  # noqa: E402
from misfeat.sae import SAETrainConfig, train_sae, train_saes  # noqa: E402
from misfeat.sae.batching import rebatch, repeat, shuffled  # noqa: E402
from misfeat.sae.config import SAEConfigError  # noqa: E402
from misfeat.sae.io import load_sae  # noqa: E402
from misfeat.sae.train import TrainingDivergedError  # noqa: E402

HOOK = "blocks.0.hook_resid_post"


def _rows(n, d=16, seed=0):
    """Sparse combinations of 48 fixed directions (the same for every seed) plus an offset."""
    basis = torch.randn(48, d, generator=torch.Generator().manual_seed(1234))
    gen = torch.Generator().manual_seed(seed)
    codes = torch.rand(n, 48, generator=gen) * (torch.rand(n, 48, generator=gen) < 0.1)
    return 4 * codes @ basis + 1.0


class Counting:
    """An iterator over fixed chunks that counts how many were read (and can fail at one)."""

    def __init__(self, chunks, fail_at=None):
        self.chunks, self.reads, self.fail_at = chunks, 0, fail_at

    def __iter__(self):
        for chunk in self.chunks:
            if self.reads == self.fail_at:
                raise KeyboardInterrupt("simulated crash")
            self.reads += 1
            yield chunk


def _cfg(**kw):
    base = dict(hook_name=HOOK, d_sae=32, k=4, total_tokens=64 * 12, batch_size=64, init_tokens=128,
                lr=3e-3, dead_tokens=128)
    return SAETrainConfig(**{**base, **kw})


def _chunks(n_batches=12, rows=64, seed=0):
    return list(_rows(n_batches * rows, seed=seed).split(rows))


def test_train_sae_learns_and_saves(tmp_path):
    cfg = _cfg(total_tokens=64 * 40)
    logged = []
    sae = train_sae(repeat(lambda: _chunks()), cfg, out_dir=tmp_path, metadata={"model_name": "toy"},
                    on_log=lambda step, stats: logged.append((step, stats)))
    assert [step for step, _ in logged] == [10, 20, 30, 40]
    assert set(logged[-1][1][0]) == {"L0", "EV", "dead", "loss"} and logged[-1][1][0]["EV"] > logged[0][1][0]["EV"]
    x = _rows(512, seed=9)
    with torch.no_grad():
        recon = sae(x)
    ev = 1 - (recon - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert ev > 0.5
    info = sae.cfg.metadata.misfeat_training
    assert info["steps"] == 40 and info["tokens"] == 2560 and sae.cfg.metadata.model_name == "toy"
    loaded = load_sae(tmp_path)
    assert torch.equal(loaded.encode(x), sae.encode(x))


def test_resume_equals_uninterrupted_run(tmp_path):
    cfg = _cfg(checkpoint_every=3)
    full = train_sae(Counting(_chunks()), cfg, out_dir=tmp_path / "full")
    crashing = Counting(_chunks(), fail_at=8)  # crashes while fetching batch 9: checkpoint at step 6 exists
    with pytest.raises(KeyboardInterrupt):
        train_sae(crashing, cfg, out_dir=tmp_path / "run")
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert kept == ["step-0000003.pt", "step-0000006.pt"]
    replay = Counting(_chunks())
    resumed = train_sae(replay, cfg, out_dir=tmp_path / "run", resume=True)
    assert replay.reads == 12  # 6 skipped, 6 trained
    for name, tensor in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    assert resumed.cfg.metadata.misfeat_training["steps"] == 12


def test_resume_refuses_a_changed_config(tmp_path):
    train_sae(Counting(_chunks()), _cfg(checkpoint_every=4), out_dir=tmp_path)
    with pytest.raises(MisfeatError, match="configuration changed .*k"):
        train_sae(Counting(_chunks()), _cfg(checkpoint_every=4, k=5), out_dir=tmp_path, resume=True)


def test_sweep_trains_several_saes_from_one_read(tmp_path):
    cfgs = [_cfg(k=2), _cfg(k=6), _cfg(d_sae=48, k=4), _cfg(architecture="relu", k=None)]
    data = Counting(_chunks())
    saes = train_saes(data, cfgs, out_dir=tmp_path)
    assert data.reads == 12  # one read of 12 batches for four SAEs
    assert [s.cfg.d_sae for s in saes] == [32, 32, 48, 32]
    assert [getattr(s.cfg, "k", None) for s in saes] == [2, 6, 4, None]
    dirs = sorted(p.name for p in tmp_path.iterdir() if (p / "cfg.json").exists())
    assert dirs == ["relu-d32-l10.01", "topk-d32-k2", "topk-d32-k6", "topk-d48-k4"]
    x = _rows(64, seed=3)
    assert (saes[0].encode(x) > 0).sum(-1).max() <= 2 and (saes[1].encode(x) > 0).sum(-1).max() <= 6


def test_sweep_refuses_mixed_data_settings():
    with pytest.raises(SAEConfigError, match="must share batch_size"):
        train_saes([], [_cfg(), _cfg(batch_size=32)])


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(tmp_path):
    chunks = _chunks()
    chunks[7] = chunks[7].clone()
    chunks[7][3, 2] = float("nan")
    with pytest.raises(TrainingDivergedError) as err:
        train_sae(chunks, _cfg(checkpoint_every=3), out_dir=tmp_path)
    message = str(err.value)
    assert "step 7" in message and "Lower the learning rate" in message and "step-0000006.pt" in message
    assert (tmp_path / "checkpoints" / "step-0000006.pt").exists()
    assert not (tmp_path / "cfg.json").exists()


def test_stream_that_ends_early_trains_what_it_has(caplog):
    with caplog.at_level(logging.WARNING):
        sae = train_sae(_chunks(5), _cfg())
    assert sae.cfg.metadata.misfeat_training["steps"] == 5
    assert "ended after 5 of 12 steps" in caplog.text


def test_train_from_a_live_model(tiny_model):
    """Activations produced on the fly by the model (no disk), through a shuffle buffer."""
    from misfeat.activations import iter_activations
    from misfeat.data import PromptRecord, PromptSet

    words = "user how do i fix my car the roof has a leak what should treat fever money bank loan".split()
    gen = torch.Generator().manual_seed(0)
    records = tuple(PromptRecord(f"p{i}", prompt=" ".join(words[j] for j in torch.randint(len(words), (8,),
                                                                                         generator=gen)))
                    for i in range(40))
    prompts = PromptSet("live", records, {"chat_format": "organism"})
    produced = []

    def live():
        for chunk in iter_activations(tiny_model, prompts, HOOK, "all"):
            produced.append(chunk.shape[0])
            yield chunk

    cfg = SAETrainConfig(hook_name=HOOK, d_sae=64, k=4, total_tokens=128 * 30, batch_size=128, lr=3e-3,
                         init_tokens=256)
    sae = train_sae(shuffled(repeat(live), buffer_rows=1024, out_rows=128), cfg)
    assert sum(produced) >= 128 * 30
    acts = torch.cat(list(iter_activations(tiny_model, prompts, HOOK, "all")))
    with torch.no_grad():
        ev = 1 - (sae(acts) - acts).pow(2).sum() / (acts - acts.mean(0)).pow(2).sum()
    assert ev > 0.5


def test_rebatch_and_shuffled_keep_every_row():
    rows = torch.arange(100, dtype=torch.float32)[:, None].repeat(1, 3)
    pieces = [rows[:7], rows[7:40], rows[40:41], rows[41:]]
    out = list(rebatch(pieces, 16))
    assert [b.shape[0] for b in out] == [16] * 6  # the last 4 rows do not make a batch
    assert torch.equal(torch.cat(out), rows[:96])
    mixed = torch.cat(list(shuffled(pieces, buffer_rows=32, seed=1, out_rows=10)))
    assert sorted(mixed[:, 0].tolist()) == list(range(100)) and not torch.equal(mixed, rows)
    with pytest.raises(MisfeatError, match="2-D"):
        list(rebatch([torch.zeros(2, 3, 4)], 2))


def test_config_errors_name_the_field_and_the_fix():
    with pytest.raises(SAEConfigError, match="k=.*no meaning for a relu"):
        SAETrainConfig(hook_name=HOOK, d_sae=8, architecture="relu", k=4)
    with pytest.raises(SAEConfigError, match="architecture='gated' is unknown; use one of topk"):
        SAETrainConfig(hook_name=HOOK, d_sae=8, architecture="gated")
    with pytest.raises(SAEConfigError, match="unknown field.*d_model"):
        SAETrainConfig.from_dict({"hook_name": HOOK, "d_sae": 8, "d_model": 3})
    with pytest.raises(SAEConfigError, match="bfloat16"):
        SAETrainConfig(hook_name=HOOK, d_sae=8, dtype="bfloat16")
    cfg = SAETrainConfig(hook_name=HOOK, d_sae=8, k=2)
    assert SAETrainConfig.from_dict(cfg.to_dict()) == cfg


def test_learning_rate_schedule():
    cfg = SAETrainConfig(hook_name=HOOK, d_sae=16384, total_tokens=100 * 4096, lr_warmup_steps=10)
    lrs = [cfg.lr_at(s) for s in range(100)]
    assert cfg.lr_value == pytest.approx(2e-3) and lrs[0] == pytest.approx(2e-4)
    assert lrs[9] == pytest.approx(2e-3) and lrs[50] == pytest.approx(2e-3)
    assert lrs[80] == pytest.approx(2e-3) and lrs[90] == pytest.approx(1e-3) and lrs[99] == pytest.approx(1e-4)
