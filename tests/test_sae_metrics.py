"""evaluate_sae: golden numbers computed by hand, and the loss metrics against sae-lens's splicing."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from misfeat.errors import MisfeatError  # noqa: E402
from misfeat.sae.metrics import ce_recovered, evaluate_sae  # noqa: E402

HOOK = "blocks.0.hook_resid_post"


def _hand_made_topk():
    """d_in 2, d_sae 3, k 1: latents 0 and 1 read and write the two axes; latent 2 never wins."""
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    sae = TopKSAE(TopKSAEConfig(d_in=2, d_sae=3, k=1, metadata=SAEMetadata(hook_name=HOOK)))
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
        sae.b_enc.copy_(torch.tensor([0.0, 0.0, -10.0]))
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]))
        sae.b_dec.zero_()
    return sae


X = torch.tensor([[3.0, 1.0], [0.0, 2.0], [-1.0, -2.0], [2.0, 4.0]])


def test_golden_reconstruction_metrics(tmp_path):
    # By hand: row 1 keeps latent 0 (3) -> x_hat (3, 0), error (0, 1): 1
    #          row 2 keeps latent 1 (2) -> x_hat (0, 2), error 0
    #          row 3: the top pre-activation is -1, ReLU'd to 0 -> x_hat (0, 0), error 1 + 4 = 5
    #          row 4 keeps latent 1 (4) -> x_hat (0, 4), error 4
    # SSE = 10; MSE = 10 / (4 rows x 2 dims) = 1.25
    # mean row (1, 1.25); SST = (4 + 1/16) + (1 + 9/16) + (4 + 169/16) + (1 + 121/16) = 28.75
    # EV = 1 - 10 / 28.75 = 0.65217...; against zero it would be 1 - 10/39 = 0.7436 (the bug)
    # L0 = (1 + 1 + 0 + 1) / 4 = 0.75; latent 2 never fires: dead 1/3
    sae = _hand_made_topk()
    m = evaluate_sae(sae, [X[:2], X[2:]], out_dir=tmp_path)
    assert m.n_tokens == 4 and m.d_sae == 3
    assert m.mse == pytest.approx(1.25)
    assert m.explained_variance == pytest.approx(1 - 10 / 28.75)
    assert m.explained_variance != pytest.approx(1 - 10 / 39)
    assert m.l0 == pytest.approx(0.75)
    assert m.n_dead == 1 and m.dead_fraction == pytest.approx(1 / 3)
    assert m.ce is None
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["explained_variance"] == pytest.approx(m.explained_variance) and saved["hook_name"] == HOOK


def test_golden_metrics_stop_at_n_tokens():
    # First two rows only: SSE 1; mean (1.5, 1.5); SST = (2.25 + 0.25) * 2 = 5 -> EV 0.8.
    # Latent 0 fires on row 1 and latent 1 on row 2: L0 1, one dead latent of three.
    m = evaluate_sae(_hand_made_topk(), iter([X[:3], X[3:]]), n_tokens=2)
    assert m.n_tokens == 2
    assert m.mse == pytest.approx(0.25)
    assert m.explained_variance == pytest.approx(0.8)
    assert m.l0 == pytest.approx(1.0) and m.n_dead == 1


def test_golden_ce_recovered():
    assert ce_recovered(ce_clean=2.0, ce_sae=2.5, ce_zero=4.0) == pytest.approx(0.75)
    assert ce_recovered(ce_clean=2.0, ce_sae=2.0, ce_zero=4.0) == pytest.approx(1.0)
    assert ce_recovered(ce_clean=2.0, ce_sae=4.5, ce_zero=4.0) == pytest.approx(-0.25)


def _prompts():
    from misfeat.data import PromptRecord, PromptSet

    texts = ["how do i fix my car", "the roof has a leak what now", "my bank loan is due", "i have a fever"]
    return PromptSet("t", tuple(PromptRecord(f"p{i}", prompt=t, response="call a doctor")
                                for i, t in enumerate(texts)), {"chat_format": "organism"})


def _reference_ce(model, prompts, fwd_hooks=(), saes=None):
    """Token-weighted next-token CE over non-padding targets, computed independently."""
    import torch.nn.functional as F

    from misfeat.data import tokenize

    batch = tokenize(prompts, model)
    if saes is not None:
        logits = model.run_with_saes(batch.tokens, saes=saes)
    else:
        logits = model.run_with_hooks(batch.tokens, fwd_hooks=list(fwd_hooks))
    mask = batch.attention_mask[:, 1:] & batch.attention_mask[:, :-1]
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch.tokens[:, 1:].reshape(-1),
                         reduction="none").view(mask.shape)
    return float(ce[mask].mean().detach()), logits


def test_ce_metrics_match_independent_computation(tiny_model):
    from sae_lens import HookedSAETransformer, StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(0)
    sae = StandardSAE(StandardSAEConfig(d_in=32, d_sae=64, metadata=SAEMetadata(hook_name=HOOK)))
    prompts = _prompts()
    acts = tiny_model.run_with_cache(tiny_model.to_tokens("how do i fix my car"), names_filter=HOOK)[1][HOOK]
    m = evaluate_sae(sae, [acts[0]], tiny_model, prompts=prompts)
    ce = m.ce
    hooked = HookedSAETransformer(tiny_model.cfg, tokenizer=tiny_model.tokenizer)
    hooked.load_state_dict(tiny_model.state_dict())
    hooked.misfeat_info = tiny_model.misfeat_info
    clean, _ = _reference_ce(hooked, prompts)
    spliced, _ = _reference_ce(hooked, prompts, saes=[sae])
    zero, _ = _reference_ce(hooked, prompts, fwd_hooks=[(HOOK, lambda a, hook: torch.zeros_like(a))])
    assert ce.ce_clean == pytest.approx(clean, rel=1e-5)
    assert ce.ce_sae == pytest.approx(spliced, rel=1e-5)
    assert ce.ce_zero == pytest.approx(zero, rel=1e-5)
    assert ce.ce_recovered == pytest.approx((zero - spliced) / (zero - clean), rel=1e-5)
    assert ce.ce_increase == pytest.approx(spliced - clean, rel=1e-5)
    assert ce.kl_sae > 0 and ce.n_prompts == 4


def test_perfect_sae_recovers_all_the_loss(tiny_model):
    """An SAE with W_enc = [I, -I], W_dec = [I; -I] reconstructs exactly: EV 1, CE recovered 1, KL 0."""
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    sae = StandardSAE(StandardSAEConfig(d_in=32, d_sae=64, metadata=SAEMetadata(hook_name=HOOK)))
    eye = torch.eye(32)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    x = torch.randn(100, 32)
    m = evaluate_sae(sae, [x], tiny_model, prompts=_prompts())
    assert m.explained_variance == pytest.approx(1.0, abs=1e-6)
    assert m.ce.ce_recovered == pytest.approx(1.0, abs=1e-5)
    assert m.ce.kl_sae == pytest.approx(0.0, abs=1e-6)
    assert m.ce.ce_zero != pytest.approx(m.ce.ce_clean)  # zero-ablation changes the loss


def test_ce_needs_prompts(tiny_model):
    with pytest.raises(MisfeatError, match="prompts"):
        evaluate_sae(_hand_made_topk(), [X], tiny_model)


def test_evaluate_on_store_checks_the_hook(tiny_model, tmp_path):
    from misfeat.activations import cache_activations, open_store

    cache_activations(tiny_model, _prompts(), ["blocks.1.hook_resid_post"], tmp_path / "store")
    store = open_store(tmp_path / "store")
    with pytest.raises(MisfeatError, match="no activations for the SAE's hook"):
        evaluate_sae(_hand_made_topk(), store)
