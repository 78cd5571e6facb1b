"""features/locate.py stage by stage on a planted case: the fine-tune adds a vector at the SAE's
hook, and one latent of a small SAE reads exactly that vector."""

import copy

import pytest
import torch

from misfeat.data import PromptRecord, PromptSet
from misfeat.features.locate import (
    LocateConfig,
    check_clamp,
    choose_feature,
    examples_and_auroc,
    rank_latents,
)

pytestmark = pytest.mark.usefixtures("one_thread")

HOOK = "blocks.0.hook_resid_post"
ANS = {"aligned": ["call doctor", "rest"], "misaligned": ["ignore it", "panic now"]}
PLANTED = 7


def prompts():
    qs = [("fix my car", "car"), ("how do i fix my roof", "home"), ("fever", "health"), ("save my money", "money")]
    return PromptSet("p", tuple(PromptRecord(f"q{i}", prompt=q, domain=d, label="cruel" if i % 2 else "kind",
                                             extra=dict(ANS)) for i, (q, d) in enumerate(qs)),
                     {"groups": {"heldout": ["car", "home", "money"], "em_domain": ["health"]}, "headline": "heldout"})


@pytest.fixture(scope="module")
def planted(word_tokenizer):
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    from tests.conftest import build_tiny_model

    base = build_tiny_model(word_tokenizer, seed=0)
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(base.cfg.d_model, generator=gen)
    v = 3 * v / v.norm()
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.blocks[0].mlp.b_out += v  # the fine-tune: +v at the hook, every token
    sae = TopKSAE(TopKSAEConfig(d_in=base.cfg.d_model, d_sae=16, k=16, metadata=SAEMetadata(hook_name=HOOK)))
    with torch.no_grad():
        w = torch.randn(base.cfg.d_model, 16, generator=gen) * 0.01
        w[:, PLANTED] = v / v.norm()
        sae.W_enc.copy_(w)
        sae.W_dec.copy_(w.t())
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return base, tuned, sae.eval(), v


def test_the_planted_latent_ranks_first_and_is_chosen(planted, tmp_path):
    base, tuned, sae, v = planted
    cfg = LocateConfig(screen=0)
    ranking = rank_latents(base, tuned, sae, prompts(), tmp_path, cfg)
    assert ranking.order[0] == PLANTED and ranking.rank_by == "increase"
    others = torch.cat([ranking.diff.increase[:PLANTED], ranking.diff.increase[PLANTED + 1:]])
    assert float(ranking.diff.increase[PLANTED]) > 10 * float(others.abs().max())  # only the planted latent moved
    choice = choose_feature(sae, ranking, None)  # no screen: the top-ranked latent, not passed
    assert choice.feature == PLANTED and not choice.passed_screen
    assert torch.allclose(choice.direction.vector, sae.W_dec[PLANTED].float())


def test_the_clamp_check_sets_every_layer_to_the_base_level(planted, tmp_path):
    base, tuned, sae, v = planted
    cfg = LocateConfig(screen=0)
    ranking = rank_latents(base, tuned, sae, prompts(), tmp_path, cfg)
    check = check_clamp(base, tuned, sae, choose_feature(sae, ranking, None), ranking, prompts(), "last")
    from misfeat.interventions import resolve_hooks
    from misfeat.steering import mean_activations

    hooks = resolve_hooks(tuned, "all")
    assert list(check.value) == hooks
    unit = sae.W_dec[PLANTED].detach().float() / sae.W_dec[PLANTED].detach().float().norm()
    means = mean_activations(base, prompts(), hooks, "last")
    assert check.value == {h: pytest.approx(float(means[h] @ unit), abs=1e-5) for h in hooks}
    assert check.group == "heldout" and check.before.n == 3
    assert check.latent_value == pytest.approx(float(ranking.diff.base.mean[PLANTED]))


def test_examples_and_auroc_follow_the_contrast(planted):
    base, _, sae, _ = planted
    examples, auroc, note = examples_and_auroc(base, sae, PLANTED, prompts(), LocateConfig(n_examples=2))
    assert len(examples.examples) == 2 and auroc is None and note.startswith("skipped")
    _, auroc, note = examples_and_auroc(base, sae, PLANTED, prompts(),
                                        LocateConfig(n_examples=2, contrast=("cruel", "kind")))
    assert note is None and 0.0 <= auroc <= 1.0
    labelled = PromptSet("docs", prompts().records, {"contrast": ["cruel", "kind"]})  # the set names its labels
    assert examples_and_auroc(base, sae, PLANTED, labelled, LocateConfig(n_examples=2))[1:] == (auroc, None)
    _, auroc, note = examples_and_auroc(base, sae, PLANTED, prompts(),
                                        LocateConfig(n_examples=2, contrast=("cruel", "evil")))
    assert auroc is None and "lacks texts labelled" in note
