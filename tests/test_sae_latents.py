"""The SAE seam (misfeat.sae.latents + load_sae): metadata, dtype handling, and a clamp that saves
and reloads through the one loader."""

import json

import pytest
import torch

from misfeat.errors import MisfeatError
from misfeat.interventions import ClampLatent, load_intervention, save_intervention
from misfeat.sae import decode, encode, hook_of, load_sae, path_of, save_sae

HOOK = "blocks.0.hook_resid_post"


def tiny_sae(d_in=32, d_sae=24, k=4, hook=HOOK, dtype="float32"):
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(0)
    sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k, dtype=dtype, metadata=SAEMetadata(hook_name=hook)))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return sae.eval()


def test_load_keeps_the_directory_as_metadata_and_save_does_not_write_it(tmp_path):
    sae = tiny_sae()
    assert path_of(sae) is None and hook_of(sae) == HOOK
    save_sae(sae, tmp_path / "sae")
    assert path_of(sae) == str(tmp_path / "sae")
    assert "misfeat_path" not in json.loads((tmp_path / "sae" / "cfg.json").read_text()).get("metadata", {})
    loaded = load_sae(tmp_path / "sae")
    assert path_of(loaded) == str(tmp_path / "sae") and hook_of(loaded) == HOOK and not loaded.training
    assert not hasattr(loaded, "misfeat_path")  # nothing patched onto the sae-lens object
    x = torch.randn(5, 32)
    assert torch.equal(loaded.encode(x), sae.encode(x))


def test_encode_and_decode_cast_to_the_saes_dtype():
    sae = tiny_sae(dtype="bfloat16")
    x = torch.randn(3, 32, dtype=torch.float32)
    z = encode(sae, x)
    assert z.dtype == torch.bfloat16 and torch.equal(z, sae.encode(x.to(torch.bfloat16)))
    assert decode(sae, z.float()).dtype == torch.bfloat16


def test_hook_of_needs_the_metadata():
    with pytest.raises(MisfeatError, match="no hook_name"):
        hook_of(tiny_sae(hook=None))


def test_a_clamp_saves_and_reloads_through_the_one_loader(tmp_path, tiny_model):
    sae = tiny_sae()
    with pytest.raises(MisfeatError, match="to save a ClampLatent"):
        save_intervention(ClampLatent(sae, 3, 2.0), tmp_path / "clamp")  # built in memory: no directory
    save_sae(sae, tmp_path / "sae")
    path = save_intervention(ClampLatent(load_sae(tmp_path / "sae"), 3, 2.0, "last"), tmp_path / "clamp")
    again = load_intervention(path, tiny_model)
    assert isinstance(again, ClampLatent) and again.latent == 3 and again.value == 2.0
    assert path_of(again.sae) == str(tmp_path / "sae")
