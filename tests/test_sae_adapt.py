"""Fine-tuning an existing SAE (stage-wise model diffing): misfeat starts from any sae-lens SAE's
exact function, the adapted dictionary gains a latent for a direction the old one lacked, and
locate --adapt-text runs locate on the adapted SAE and saves it."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from misfeat.errors import MisfeatError  # noqa: E402
from misfeat.sae.adapt import adapt_sae, fine_tune_config  # noqa: E402
from misfeat.sae.config import SAETrainConfig  # noqa: E402
from misfeat.sae.io import load_sae_lens_into, to_sae_lens  # noqa: E402
from misfeat.sae.model import SparseAutoencoder  # noqa: E402
from tests.test_sae_io import HOOK, _data, _trained  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _sae_lens(arch, d_in=32, d_sae=48, apply_b_dec=True, unit_rows=True, seed=0):
    """A sae-lens SAE with random weights (decoder rows of random norms unless ``unit_rows``)."""
    import sae_lens
    from sae_lens.saes.sae import SAEMetadata

    common = dict(d_in=d_in, d_sae=d_sae, apply_b_dec_to_input=apply_b_dec, metadata=SAEMetadata(hook_name=HOOK))
    cls, cfg_cls, extra = {"topk": ("TopKSAE", "TopKSAEConfig", {"k": 6}), "standard": ("StandardSAE", "StandardSAEConfig", {}),
                           "jumprelu": ("JumpReLUSAE", "JumpReLUSAEConfig", {})}[arch]
    sae = getattr(sae_lens, cls)(getattr(sae_lens, cfg_cls)(**extra, **common))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = torch.randn(d_sae, d_in, generator=gen)
        norms = torch.ones(d_sae, 1) if unit_rows else 0.2 + 3 * torch.rand(d_sae, 1, generator=gen)
        sae.W_dec.copy_(w / w.norm(dim=1, keepdim=True) * norms)
        sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=gen) / d_in**0.5)
        sae.b_enc.copy_(0.3 * torch.randn(d_sae, generator=gen))
        sae.b_dec.copy_(torch.randn(d_in, generator=gen))
        if arch == "jumprelu":
            sae.threshold.copy_(0.2 * torch.rand(d_sae, generator=gen))
    return sae.eval()


@pytest.mark.parametrize("arch,apply_b_dec,unit_rows", [("topk", True, True), ("standard", True, False),
                                                         ("standard", False, False), ("jumprelu", True, False)])
def test_fine_tuning_starts_from_the_sae_lens_sae_exactly(arch, apply_b_dec, unit_rows):
    """Loaded into misfeat's training module (any input scale) and saved back, the SAE computes what
    sae-lens computed: decoder norms moved into the encoder, b_dec folded into b_enc where sae-lens
    does not subtract it."""
    sae = _sae_lens(arch, apply_b_dec=apply_b_dec, unit_rows=unit_rows)
    cfg = fine_tune_config(sae, 4096, **({"k": 4} if arch == "jumprelu" else {}))
    module = SparseAutoencoder(cfg, 32)
    scale = 0.37
    load_sae_lens_into(module, sae, scale)
    assert torch.allclose(module.W_dec.norm(dim=1), torch.ones(48))
    back = to_sae_lens(module, scale)
    x = 2 * torch.randn(200, 32, generator=torch.Generator().manual_seed(5)) + 1
    with torch.no_grad():
        ref = sae(x)
        assert (sae.encode(x) > 0).any(1).float().mean() > 0.5  # latents fire: the comparison means something
        torch.testing.assert_close(back(x), ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(module.decode(module.encode(x * scale)) / scale, ref, rtol=1e-4, atol=1e-4)


def test_misfeat_trained_sae_round_trips_bit_for_bit():
    module, stats = _trained("topk", _data())
    sae = to_sae_lens(module, stats.scale)
    again = SparseAutoencoder(module.cfg, 32)
    load_sae_lens_into(again, sae, stats.scale)
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        torch.testing.assert_close(getattr(again, name), getattr(module, name), rtol=1e-6, atol=1e-6)


def test_what_cannot_be_fine_tuned_is_refused_with_the_reason():
    with pytest.raises(MisfeatError, match="not unit norm"):
        load_sae_lens_into(SparseAutoencoder(fine_tune_config(_sae_lens("topk"), 4096), 32),
                           _sae_lens("topk", unit_rows=False), 1.0)
    with pytest.raises(MisfeatError, match="cannot start a relu SAE from a sae-lens 'topk'"):
        cfg = SAETrainConfig(hook_name=HOOK, d_sae=48, architecture="relu", total_tokens=4096, batch_size=512)
        load_sae_lens_into(SparseAutoencoder(cfg, 32), _sae_lens("topk"), 1.0)
    with pytest.raises(MisfeatError, match="target L0"):
        fine_tune_config(_sae_lens("jumprelu"), 4096)


def _rows(n, seed, share_v):
    """Rows of two active atoms out of 24 orthonormal ones (plus an offset); on ``share_v`` of them
    also ``2 v``, with ``v`` orthogonal to every atom. Returns (rows, v)."""
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(0)))
    gen = torch.Generator().manual_seed(seed)
    codes = torch.zeros(n, 24).scatter_(1, torch.randint(24, (n, 2), generator=gen), 1 + 2 * torch.rand(n, 2, generator=gen))
    on = torch.rand(n, generator=gen) < share_v
    return codes @ q[:24] + 0.5 + on[:, None] * 2.0 * q[24], q[24]


def _batches(x, tokens, size=256):
    return (x[i % len(x):][:size] for i in range(0, tokens, size))


def test_adaptation_gains_a_latent_for_a_new_direction_and_keeps_the_rest():
    """An SAE trained on data without direction v has no row near it; fine-tuned on data where v
    appears, one latent turns to v while most rows stay where they were (stage-wise diffing)."""
    from misfeat.sae.train import train_sae

    old, v = _rows(16384, 0, 0.0)
    cfg = SAETrainConfig(hook_name=HOOK, d_sae=48, k=2, total_tokens=32768, batch_size=256, lr=3e-3, dead_tokens=2048)
    sae = train_sae(_batches(old, 32768), cfg, show_progress=False)
    assert sae.cfg.metadata.misfeat_training["last_batch"]["EV"] > 0.9
    before = sae.W_dec.detach().clone()
    new, _ = _rows(16384, 1, 0.3)
    adapted = adapt_sae(sae, _batches(new, 8192), tokens=8192, batch_size=256)
    along_v = (adapted.sae.W_dec.detach() @ v).abs()
    assert float((before @ v).abs().max()) < 0.4 and float(along_v.max()) > 0.95
    assert float(adapted.decoder_cosine[along_v.argmax()]) < 0.5  # the latent that took v turned
    assert adapted.most_changed(1)[0]["decoder_cosine"] == pytest.approx(float(adapted.decoder_cosine.min()))
    assert float(adapted.decoder_cosine.median()) > 0.8  # most latents kept their meaning
    assert torch.equal(sae.W_dec, before)  # the original is left as it was
    assert adapted.info["steps"] == 32 and adapted.sae.cfg.metadata.misfeat_training["config"]["k"] == 2


def test_train_sae_init_fine_tunes_a_saved_sae(tmp_path, tiny_model):
    from misfeat.activations import cache_activations
    from misfeat.cli import main
    from misfeat.data import PromptRecord, PromptSet
    from misfeat.sae.io import load_sae
    from tests.conftest import WORDS

    gen = torch.Generator().manual_seed(0)
    text = PromptSet("words", tuple(PromptRecord(f"t{i}", prompt=" ".join(WORDS[j] for j in torch.randint(
        len(WORDS), (12,), generator=gen).tolist())) for i in range(150)))
    cache_activations(tiny_model, text, ["blocks.0.hook_resid_post"], tmp_path / "cache", positions="all")
    assert main(["train-sae", "--cache", str(tmp_path / "cache"), "--d-sae", "64", "--k", "4", "--tokens", "4096",
                 "--batch-size", "512", "--out", str(tmp_path / "old")]) == 0
    assert main(["train-sae", "--cache", str(tmp_path / "cache"), "--init", str(tmp_path / "old"), "--tokens", "2048",
                 "--batch-size", "512", "--out", str(tmp_path / "new")]) == 0
    old, new = load_sae(tmp_path / "old"), load_sae(tmp_path / "new")
    assert (new.cfg.d_sae, new.cfg.k) == (64, 4) and new.cfg.metadata.adapted_from == str(tmp_path / "old")
    cos = torch.nn.functional.cosine_similarity(old.W_dec, new.W_dec, dim=1)
    assert float(cos.median()) > 0.5 and not torch.equal(old.W_dec, new.W_dec)  # continued, not restarted
    assert main(["train-sae", "--cache", str(tmp_path / "cache"), "--init", str(tmp_path / "old"), "--d-sae", "32",
                 "--tokens", "2048", "--out", str(tmp_path / "bad")]) == 2


def test_locate_adapt_text_finds_the_feature_an_sae_of_the_base_model_lacks(planted, tmp_path):
    """The planted fine-tune adds v at the hook; an SAE trained on the base model alone has no latent
    along v. With adapt_text, locate fine-tunes it on both models' activations of that text first, and
    the latent it then chooses writes along v; the adapted SAE is saved and the outputs refer to it."""
    import json

    from sae_lens import SAE

    from misfeat.activations import cache_activations, open_store
    from misfeat.features.locate import LocateConfig, locate, save_locate
    from misfeat.sae.sources import cache_source
    from misfeat.sae.train import train_sae
    from tests.conftest import PLANTED_HOOK, WORDS, planted_prompts

    base, tuned, _, v = planted
    gen = torch.Generator().manual_seed(0)
    lines = [" ".join(WORDS[j] for j in torch.randint(len(WORDS), (12,), generator=gen).tolist()) for _ in range(150)]
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"id": f"t{i}", "prompt": p}) + "\n" for i, p in enumerate(lines)))
    cache_activations(base, str(text), [PLANTED_HOOK], tmp_path / "base-cache", positions="all")
    source = cache_source(tmp_path / "base-cache", batch_size=256, tokens=16384)
    cfg = SAETrainConfig(hook_name=PLANTED_HOOK, d_sae=32, k=4, total_tokens=16384, batch_size=256)
    sae = train_sae(source.batches, cfg, show_progress=False)
    u = v / v.norm()

    def along_v(s):
        return (s.W_dec.detach() @ u).abs()

    config = LocateConfig(screen=0, group_cap=0, screen_decreases=0, adapt_text=str(text), adapt_tokens=32768)
    result = save_locate(locate(base, tuned, sae, planted_prompts(), tmp_path / "work", config), tmp_path / "out")
    adapted = SAE.load_from_disk(str(tmp_path / "out" / "sae"))
    assert float(along_v(sae).max()) < 0.5  # the base model's SAE has no latent along v
    assert float(along_v(adapted)[result.feature]) > 0.75 and result.feature == int(along_v(adapted).argmax())
    s = result.to_dict()
    a = s["adapted"]
    assert a["sae"] == str(tmp_path / "out" / "sae") and a["models"] == ["base", "finetuned"]
    rows = open_store(tmp_path / "base-cache").n_rows  # the same text: as many rows per model
    assert a["rows_per_model"] == rows and a["batch_size"] == rows // 2 and a["steps"] == 32768 // (rows // 2)
    assert a["text"] == str(text)
    assert a["feature_decoder_cosine"] == pytest.approx(float(result.adapted.decoder_cosine[result.feature]))
    assert s["top_latents"][0]["decoder_cosine_to_original"] == a["feature_decoder_cosine"]
    direction = json.loads((tmp_path / "out" / "direction.json").read_text())
    assert direction["source"]["sae"] == a["sae"]
