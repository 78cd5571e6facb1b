"""Saved SAEs are real sae-lens SAEs: they load, splice into HookedSAETransformer and
reproduce misfeat's own encode/decode with the input normalisation folded in."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from misfeat.errors import MisfeatError  # noqa: E402
from misfeat.sae.config import SAETrainConfig  # noqa: E402
from misfeat.sae.io import load_sae, save_sae, to_sae_lens  # noqa: E402
from misfeat.sae.train import SAETrainer, estimate_stats  # noqa: E402

HOOK = "blocks.0.hook_resid_post"
ARCHS = ["topk", "batchtopk", "relu", "jumprelu"]


def _data(n=512, d=32, seed=0):
    """Rows with a large mean and scale, so that folding the normalisation matters."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.randn(64, d, generator=gen)
    codes = torch.rand(n, 64, generator=gen) * (torch.rand(n, 64, generator=gen) < 0.08)
    return 7.0 * (codes @ basis) + 3.0


def _trained(arch, x, steps=25, d_sae=64):
    cfg = SAETrainConfig(hook_name=HOOK, d_sae=d_sae, architecture=arch, k=None if arch == "relu" else 4,
                         total_tokens=steps * 128, batch_size=128, lr=3e-3, dead_tokens=256)
    stats = estimate_stats([x], normalize=True)
    trainer = SAETrainer(cfg, x.shape[1], stats, torch.device("cpu"))
    for step in range(steps):
        trainer.step(x[(step * 128) % len(x):][:128] * stats.scale, step)
    return trainer.module, stats


@pytest.mark.parametrize("arch", ARCHS)
def test_saved_sae_reproduces_training_module_on_raw_activations(arch, tmp_path):
    """Folding: the saved SAE on raw x equals the trained module on s*x, rescaled by 1/s."""
    x = _data()
    module, stats = _trained(arch, x)
    s = stats.scale
    assert abs(s - 1.0) > 0.1  # the data really needed scaling
    sae = to_sae_lens(module, s, {"model_name": "tiny"})
    save_sae(sae, tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["normalize_activations"] == "none" and cfg["metadata"]["hook_name"] == HOOK
    loaded = load_sae(tmp_path)
    expected_arch = {"topk": "topk", "relu": "standard"}.get(arch, "jumprelu")
    assert loaded.cfg.architecture() == expected_arch
    with torch.no_grad():
        acts_ref = module.encode(x * s) / s
        recon_ref = module.decode(module.encode(x * s)) / s
        for candidate in (sae, loaded):
            acts = candidate.encode(x)
            torch.testing.assert_close(acts, acts_ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(candidate.decode(acts), recon_ref, rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(candidate(x), recon_ref, rtol=1e-5, atol=1e-4)
        assert (acts_ref > 0).sum(-1).float().mean() > 0.5  # latents really fire
    if arch == "topk":
        assert loaded.cfg.k == 4 and loaded.cfg.rescale_acts_by_decoder_norm is False


def test_load_from_disk_is_bit_identical(tmp_path):
    from sae_lens import SAE

    module, stats = _trained("topk", _data())
    sae = to_sae_lens(module, stats.scale)
    save_sae(sae, tmp_path / "sae")
    loaded = SAE.load_from_disk(str(tmp_path / "sae"))
    for name, tensor in sae.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    x = _data(seed=1)
    assert torch.equal(sae.encode(x), loaded.encode(x))


def test_decoder_rows_stay_unit_norm():
    module, stats = _trained("topk", _data(), steps=10)
    norms = module.W_dec.norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms))
    saved = to_sae_lens(module, stats.scale)
    torch.testing.assert_close(saved.W_dec.norm(dim=-1), torch.ones_like(norms))


def test_b_dec_starts_at_the_data_mean():
    x = _data()
    stats = estimate_stats([x], normalize=True)
    cfg = SAETrainConfig(hook_name=HOOK, d_sae=64, k=4, total_tokens=1024, batch_size=128)
    trainer = SAETrainer(cfg, 32, stats, torch.device("cpu"))
    torch.testing.assert_close(trainer.module.b_dec.detach(), x.mean(0) * stats.scale)
    torch.testing.assert_close((x * stats.scale).pow(2).sum(-1).mean(), torch.tensor(32.0))


def test_hooked_sae_transformer_reconstruction_matches_misfeat(tiny_model, tmp_path):
    """Splice the saved SAE with HookedSAETransformer: its reconstruction at the hook equals
    misfeat's encode/decode of the same activations."""
    from sae_lens import SAE, HookedSAETransformer

    tokens = tiny_model.to_tokens(["user how do i fix my car", "user the roof has a leak what now"])
    _, cache = tiny_model.run_with_cache(tokens, names_filter=HOOK)
    acts = cache[HOOK].reshape(-1, 32)
    module, stats = _trained("topk", acts.repeat(40, 1) + 0.01 * torch.randn(acts.shape[0] * 40, 32),
                             steps=20)
    save_sae(to_sae_lens(module, stats.scale, {"model_name": "tiny"}), tmp_path)
    sae = SAE.load_from_disk(str(tmp_path))
    model = HookedSAETransformer(tiny_model.cfg, tokenizer=tiny_model.tokenizer)
    model.load_state_dict(tiny_model.state_dict())
    model.eval()
    _, sae_cache = model.run_with_cache_with_saes(tokens, saes=[sae])
    x = sae_cache[f"{HOOK}.hook_sae_input"].reshape(-1, 32)
    torch.testing.assert_close(x, acts)
    with torch.no_grad():
        ours = module.decode(module.encode(x * stats.scale)) / stats.scale
    torch.testing.assert_close(sae_cache[f"{HOOK}.hook_sae_recons"].reshape(-1, 32), ours, rtol=1e-5, atol=1e-4)
    logits_spliced = model.run_with_saes(tokens, saes=[sae])
    assert not torch.allclose(logits_spliced, model(tokens))  # the SAE really was in the forward


def test_load_sae_explains_a_missing_directory(tmp_path):
    with pytest.raises(MisfeatError, match="not an SAE directory"):
        load_sae(tmp_path)
