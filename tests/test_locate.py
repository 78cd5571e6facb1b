"""features/locate.py stage by stage on a planted case: the fine-tune adds a vector at the SAE's
hook, and one latent of a small SAE reads exactly that vector."""

import pytest
import torch

from misfeat.data import PromptSet
from misfeat.features.locate import (
    LocateConfig,
    check_clamp,
    choose_feature,
    examples_and_auroc,
    held_out_warnings,
    rank_latents,
)
from tests.conftest import PLANTED
from tests.conftest import planted_prompts as prompts

pytestmark = pytest.mark.usefixtures("one_thread")

HOOK = "blocks.0.hook_resid_post"


def _orthogonal(v: torch.Tensor, seed: int) -> torch.Tensor:
    """A random unit vector orthogonal to ``v``."""
    u = v / v.norm()
    w = torch.randn(v.shape[0], generator=torch.Generator().manual_seed(seed))
    w = w - (w @ u) * u
    return w / w.norm()


def test_the_planted_latent_ranks_first_and_is_chosen(planted, tmp_path):
    base, tuned, sae, v = planted
    cfg = LocateConfig(screen=0)
    ranking = rank_latents(base, tuned, sae, prompts(), tmp_path, cfg)
    assert ranking.order[0] == PLANTED and ranking.rank_by == "mean_diff"  # the default
    by_increase = rank_latents(base, tuned, sae, prompts(), tmp_path / "increase", LocateConfig(screen=0, rank_by="increase"))
    assert by_increase.order[0] == PLANTED
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


def test_mean_diff_ranking_passes_over_a_latent_that_rises_off_the_change(planted, tmp_path):
    """A decoy latent reads the fine-tune's vector v twice as strongly as the planted one but writes
    an orthogonal direction: it rises most, yet adds nothing along the mean difference."""
    import copy

    from misfeat.steering import mean_activations

    base, tuned, sae, v = planted
    sae = copy.deepcopy(sae)
    decoy = (PLANTED + 1) % 16
    u, w = v / v.norm(), _orthogonal(v, seed=3)
    with torch.no_grad():
        sae.W_enc[:, decoy] = 2 * u
        sae.W_dec[decoy] = w
    by_increase = rank_latents(base, tuned, sae, prompts(), tmp_path / "a", LocateConfig(screen=0, rank_by="increase"))
    assert by_increase.order[0] == decoy
    ranking = rank_latents(base, tuned, sae, prompts(), tmp_path / "b", LocateConfig(screen=0))  # the default
    assert ranking.order[0] == PLANTED
    md = (mean_activations(tuned, prompts(), [HOOK], "last")[HOOK]
          - mean_activations(base, prompts(), [HOOK], "last")[HOOK])  # by hand
    want = ranking.diff.increase.clamp_min(0) * (sae.W_dec.detach() @ (md / md.norm()))
    ranked = want[ranking.order]  # the hand formula's scores, in the ranking's order: non-increasing
    assert bool((ranked[1:] <= ranked[:-1] + 1e-4 * float(want.abs().max())).all())
    assert float(want[decoy]) == pytest.approx(0.0, abs=0.05 * float(want[PLANTED]))


def test_a_latent_that_never_fires_is_screened_for_its_decoder_direction(planted, tmp_path):
    """A latent whose decoder row writes the fine-tune's vector v but whose encoder never fires does not
    rise, so no activation ranking reaches it; screen_aligned adds it to the screen by its decoder cosine
    with the mean-difference direction."""
    import copy

    base, tuned, sae, v = planted
    sae = copy.deepcopy(sae)
    silent = (PLANTED + 3) % 16
    with torch.no_grad():
        sae.W_dec[silent] = v / v.norm()
        sae.W_enc[:, silent] = 0.0
        sae.b_enc[silent] = -100.0
    ranking = rank_latents(base, tuned, sae, prompts(), tmp_path, LocateConfig(screen=0))
    assert float(ranking.diff.increase[silent]) == 0.0 and ranking.order.index(silent) > 0
    assert float(ranking.decoder_cosine[silent]) == pytest.approx(1.0, abs=0.05)
    assert ranking.candidates(1) == [PLANTED]
    assert ranking.candidates(1, aligned=1) == [PLANTED, silent]  # the planted latent is not added twice
    assert ranking.candidates(1, aligned=2)[:2] == [PLANTED, silent]


def test_each_finetunes_own_top_latents_join_the_screen(planted, tmp_path):
    """Two fine-tunes: the first adds v (read by the planted latent), the second a weaker vector w orthogonal to v
    read by another latent. Averaged, the planted latent ranks first and a screen of one leaves the other out; in the
    second model's own order it is first, so screen_each adds it. One fine-tune: no effect."""
    import copy

    base, tuned, sae, v = planted
    sae = copy.deepcopy(sae)
    other = (PLANTED + 5) % 16
    w = 1.5 * _orthogonal(v, seed=4)
    with torch.no_grad():
        sae.W_enc[:, other] = w / w.norm()
        sae.W_dec[other] = w / w.norm()
    second = copy.deepcopy(base)
    with torch.no_grad():
        second.blocks[0].mlp.b_out += w
    cfg = LocateConfig(screen=0)
    ranking = rank_latents(base, [tuned, second], sae, prompts(), tmp_path / "two", cfg)
    assert ranking.order[0] == PLANTED
    assert [o[0] for o in ranking.orders_each] == [PLANTED, other]  # each model's own top latent
    assert ranking.candidates(1) == [PLANTED]
    assert ranking.candidates(1, each=1) == [PLANTED, other]
    assert ranking.candidates(2, each=1) == ranking.order[:2]  # both models' top latents are among the averaged top 2
    assert ranking.candidates(1, each=3)[:2] == [PLANTED, ranking.orders_each[0][1]]  # no latent twice
    assert len(set(ranking.candidates(1, each=3))) == len(ranking.candidates(1, each=3))
    one = rank_latents(base, tuned, sae, prompts(), tmp_path / "one", cfg)
    assert one.orders_each == [] and one.candidates(2, aligned=1, each=5) == one.candidates(2, aligned=1)


@pytest.mark.parametrize("bad,match", [({"rank_by": "size"}, "rank_by must be one of"),
                                       ({"adapt_with": "base"}, "adapt_with must be one of"),
                                       ({"adapt_tokens": 0}, "adapt_tokens must be at least 1"),
                                       ({"screen_aligned": -1}, "screen_aligned must be 0 or more"),
                                       ({"screen_each": -1}, "screen_each must be 0 or more"),
                                       ({"group_steer": "sum"}, "group_steer must be one of"),
                                       ({"group_select": "steer"}, "group_select must be one of"),
                                       ({"group_combine": "max"}, "group_combine must be one of"),
                                       ({"max_coef": 0.0}, "max_coef must be a positive strength"),
                                       ({"bisect": -1}, "bisect must be 0 or more"),
                                       ({"coefs": ()}, "coefs must be one or more strengths"),
                                       ({"coefs": (1.0, -1.0)}, "coefs must be one or more strengths")])
def test_bad_locate_settings_are_refused_before_any_work(bad, match):
    from misfeat.errors import MisfeatError

    with pytest.raises(MisfeatError, match=match):
        LocateConfig(**bad)


def test_held_out_warnings_name_each_fine_tunes_own_domain():
    from types import SimpleNamespace

    from misfeat.data import load_prompts
    from misfeat.models import ModelInfo
    from misfeat.organism.world import make_world

    world = make_world("health").to_json()  # an em-ref checkpoint carries its build's world (EM domain health)

    def fine_tune(stage):
        return SimpleNamespace(misfeat_info=ModelInfo(f"organism:{stage}", "organism",
                                                      meta={"organism": {"stage": stage}, "world": world}))

    em, money = fine_tune("em"), fine_tune("em-ref/money")
    heldout = load_prompts("organism:heldout")  # held out from the health fine-tune only
    assert held_out_warnings([em], heldout) == []
    (warning,) = held_out_warnings([em, money], heldout)
    assert "domain(s) money that organism:em-ref/money" in warning and "heldout-from" in warning
    assert held_out_warnings([em, money], load_prompts("organism:heldout-from=health,money")) == []
    assert held_out_warnings([em], load_prompts("organism:all")) == []  # its headline group leaves health out
    every = PromptSet("mine", load_prompts("organism:all").records)  # a user's file: one group, every domain
    assert "domain(s) health that organism:em" in held_out_warnings([em], every)[0]
    assert held_out_warnings([SimpleNamespace()], heldout) == []  # a model without a plug-in: nothing to say
