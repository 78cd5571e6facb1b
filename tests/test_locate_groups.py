"""Locate beyond one latent, on planted cases: batched scoring equals evaluate(), the greedy group
finds both halves of a split feature, several fine-tunes are averaged, decreases are screened up,
and the baselines are the directions and evaluations they name (computed here by hand)."""

import copy

import pytest
import torch

from misfeat.errors import MisfeatError
from misfeat.evaluate import evaluate
from misfeat.features import groups
from misfeat.features.batched import batched_rates
from misfeat.features.groups import families, pursuit_candidates, select_group, subspace_clamp
from misfeat.features.locate import LocateConfig, locate, rank_latents, save_locate
from misfeat.features.locate_group import group_method
from misfeat.features.screen import screen_decreases
from misfeat.interventions import Ablate, Add, load_intervention, orthonormal_rows, resolve_hooks
from misfeat.steering import mean_activations
from tests.conftest import PLANTED, PLANTED_HOOK, planted_prompts

pytestmark = pytest.mark.usefixtures("one_thread")
A, B = 3, 11  # the two halves of the split feature


@pytest.fixture(scope="module")
def split(planted):
    """(base, tuned, sae, v): the planted SAE rotated so that latents A and B each read one
    orthogonal half of the fine-tune's vector v (a feature split across two latents)."""
    base, tuned, sae, v = planted
    sae = copy.deepcopy(sae)
    gen = torch.Generator().manual_seed(5)
    u = v / v.norm()
    w = torch.randn(v.shape[0], generator=gen)
    w = w - (w @ u) * u
    w = w / w.norm()
    halves = [(u + w) / 2 ** 0.5, (u - w) / 2 ** 0.5]  # v = |v|/sqrt2 * (half_A + half_B)
    with torch.no_grad():
        sae.W_dec[PLANTED] = torch.randn(v.shape[0], generator=gen) * 0.01
        sae.W_enc[:, PLANTED] = sae.W_dec[PLANTED]
        for latent, h in zip((A, B), halves, strict=True):
            sae.W_dec[latent] = h
            sae.W_enc[:, latent] = h
    return base, tuned, sae, v


@pytest.mark.parametrize("shared", [True, False])
def test_batched_rates_equal_one_evaluation_per_variant(planted, shared):
    base, _, sae, v = planted
    ps = planted_prompts()
    hooks = resolve_hooks(base, "all")
    u = v / v.norm()
    rows = orthonormal_rows(torch.stack([u, sae.W_dec[0].detach()]))
    variants = [[], [Add(PLANTED_HOOK, u, 2.0, "last")], [Add(PLANTED_HOOK, u, -1.5, "all")],
                [Ablate("all", u, {h: 0.3 for h in hooks}, "all")],
                [Ablate("all", rows, {h: [0.2, -0.1] for h in hooks}, "all"), Add(PLANTED_HOOK, u, 1.0, "prompt")]]
    got = batched_rates(base, ps, variants, max_batch_tokens=40, shared_prompts=shared)  # several batches
    for variant, rates in zip(variants, got, strict=True):
        want = evaluate(base, ps, interventions=variant, greedy=False).headline
        assert rates["misaligned_rate"] == pytest.approx(want.misaligned_rate, abs=1e-5)
        assert rates["valid_rate"] == pytest.approx(want.valid_rate, abs=1e-5)


def test_a_subspace_clamp_sets_the_span_to_the_reference_mean(planted):
    base, tuned, sae, _ = planted
    hooks = resolve_hooks(tuned, "all")
    means = {h: m.cpu() for h, m in mean_activations(base, planted_prompts(), hooks, "last").items()}
    vectors = sae.W_dec[[1, 2]].detach().float()
    clamp = subspace_clamp(vectors, means)
    act = torch.randn(2, 5, base.cfg.d_model)
    out = clamp.edit(act, hooks[0])
    q, _ = torch.linalg.qr(vectors.T.double())  # the projector onto the span, by hand
    proj = (q @ q.T).float()
    torch.testing.assert_close(out @ proj, (means[hooks[0]] @ proj).expand_as(out), atol=1e-5, rtol=0)
    torch.testing.assert_close(out - out @ proj, act - act @ proj, atol=1e-5, rtol=0)  # the rest untouched


def test_greedy_group_finds_both_halves_and_stops(split, monkeypatch):
    """A stub evaluation whose misaligned rate is the share of v left outside the clamped span:
    the greedy group must be exactly the two halves (the best single latent cuts only half)."""
    base, tuned, sae, v = split
    u = v / v.norm()

    breaker = sae.W_dec[9].detach().float()  # latent 9 cuts everything, but breaks the model

    def rates(model, prompts, variants, batched=True):
        out = []
        for (clamp,) in variants:
            left = u - (u @ clamp.direction.T) @ clamp.direction
            broken = float((clamp.direction @ (breaker / breaker.norm())).norm()) > 0.99
            out.append({"misaligned_rate": 0.0 if broken else 0.1 + 0.8 * float(left.norm() ** 2),
                        "valid_rate": 0.1 if broken else 1.0})
        return out

    monkeypatch.setattr(groups, "run_variants", rates)
    means = {h: torch.zeros(base.cfg.d_model) for h in resolve_hooks(tuned, "all")}
    latents, steps = select_group(sae, [0, A, 5, B, 9], [tuned], planted_prompts(), means, before=0.9, cap=8,
                                  min_valid=0.8)
    assert sorted(latents) == [A, B]
    assert steps[0]["clamp_misaligned"] == pytest.approx(0.5, abs=1e-4)  # one half: 0.1 + 0.8 * 1/2
    assert steps[-1]["clamp_misaligned"] == pytest.approx(0.1, abs=1e-4)


def test_two_sided_greedy_group_counts_the_steered_rise(split, monkeypatch):
    """The stub clamp of the test above, and a stub steering under which only groups holding latent 5 raise the
    aligned model's rate (by 0.5): two-sided, 5 joins first (fall ~0 + rise 0.5 beats a half's fall of 0.4), then
    both halves (each adds a fall of 0.4); latent 0 adds nothing and the group stops. Clamp-only: the two halves."""
    base, tuned, sae, v = split
    u = v / v.norm()

    def rates(model, prompts, variants, batched=True):
        return [{"misaligned_rate": 0.1 + 0.8 * float((u - (u @ c.direction.T) @ c.direction).norm() ** 2),
                 "valid_rate": 1.0} for (c,) in variants]

    asked = []

    def steer_up(candidates):
        asked.append(candidates)
        return [0.6 if 5 in g else 0.1 for g in candidates]

    monkeypatch.setattr(groups, "run_variants", rates)
    means = {h: torch.zeros(base.cfg.d_model) for h in resolve_hooks(tuned, "all")}
    kwargs = dict(before=0.9, cap=8, min_valid=0.8, tol=0.05)
    latents, steps = select_group(sae, [0, A, 5, B], [tuned], planted_prompts(), means, steer_up=steer_up, up0=0.1,
                                  **kwargs)
    assert latents[0] == 5 and sorted(latents[1:]) == [A, B]
    assert asked[0] == [[0], [A], [5], [B]] and asked[1] == [[5, 0], [5, A], [5, B]]
    assert [s["steer_up_misaligned"] for s in steps] == [0.6, 0.6, 0.6]
    assert steps[-1]["clamp_misaligned"] == pytest.approx(0.1, abs=0.02)  # latent 5's row: a little of v too
    latents, steps = select_group(sae, [0, A, 5, B], [tuned], planted_prompts(), means, **kwargs)
    assert sorted(latents) == [A, B] and "steer_up_misaligned" not in steps[0]


def test_pursuit_candidates_on_a_hand_computed_decoder():
    """Rows e0, e1, e2, (e0+e1)/sqrt2, e3 and v = 3e0 + 2e1 + 0.8e2 + 0.3e3: the row closest to v is 3 (|cos| ~
    3.54/|v|), then 0; with latent 3 in the group the part of v outside its row is 0.5e0 - 0.5e1 + 0.8e2 + 0.3e3,
    closest to e2, then e0 / e1, then e3; a vector the group spans, or orthogonal to every row left, adds nothing."""
    e = torch.eye(4)
    w = torch.stack([e[0], e[1], e[2], (e[0] + e[1]) / 2 ** 0.5, e[3]]) * torch.tensor([[1.0], [2.0], [0.5], [3.0], [1.0]])
    v = 3 * e[0] + 2 * e[1] + 0.8 * e[2] + 0.3 * e[3]
    assert pursuit_candidates(w, [v], [], []) == [3]
    assert pursuit_candidates(w, [v], [], [], n=2) == [3, 0]  # row norms do not count, only directions
    assert pursuit_candidates(w, [v], [3], [3]) == [2]
    assert pursuit_candidates(w, [v], [3], [3, 2, 0, 1]) == [4]
    assert pursuit_candidates(w, [v, e[2]], [3], [3]) == [2]  # e2's own pick is taken by v; no other row reads it
    assert pursuit_candidates(w, [v, 2 * e[0] - e[1]], [3], [3]) == [2, 0]  # per vector, none twice
    assert pursuit_candidates(w, [v], [0, 1, 2, 4], [0, 1, 2, 4]) == []  # v is in the group's span


def test_pursuit_brings_the_missing_half_into_the_group(split, monkeypatch):
    """The stub clamp of the greedy test with half B left out of the candidates: alone, the group is A and the
    share of v outside A's row stays; with the pursuit on v, B (the row closest to v outside the candidates) is
    offered at the first step and joins, and the group cuts as far as with both halves screened."""
    base, tuned, sae, v = split
    u = v / v.norm()

    def rates(model, prompts, variants, batched=True):
        return [{"misaligned_rate": 0.1 + 0.8 * float((u - (u @ c.direction.T) @ c.direction).norm() ** 2),
                 "valid_rate": 1.0} for (c,) in variants]

    monkeypatch.setattr(groups, "run_variants", rates)
    means = {h: torch.zeros(base.cfg.d_model) for h in resolve_hooks(tuned, "all")}
    kwargs = dict(before=0.9, cap=8, min_valid=0.8, tol=0.05)
    alone, _ = select_group(sae, [0, A, 5], [tuned], planted_prompts(), means, **kwargs)
    assert A in alone and B not in alone

    def pursue(group, pool):
        return pursuit_candidates(sae.W_dec, [v], group, [*group, *pool])

    latents, steps = select_group(sae, [0, A, 5], [tuned], planted_prompts(), means, pursue=pursue, **kwargs)
    assert sorted(latents) == [A, B] and steps[0]["pursued"] == [B]
    assert steps[-1]["clamp_misaligned"] == pytest.approx(0.1, abs=1e-4)


def test_the_clamp_fall_over_several_models_on_hand_computed_cases():
    """mean: the mean rate's fall; worst: the mean rate before x the smallest relative cut (models with nothing to
    cut left out); one model: both the plain fall."""
    fall = groups._clamp_fall
    assert fall([0.8, 0.5], [0.2, 0.4], "mean") == pytest.approx(0.65 - 0.3)
    assert fall([0.8, 0.5], [0.2, 0.4], "worst") == pytest.approx(0.65 * 0.2)  # cuts 75% and 20%
    assert fall([0.8, 0.0], [0.2, 0.1], "worst") == pytest.approx(0.4 * 0.75)
    assert fall([0.0, 0.0], [0.1, 0.1], "worst") == 0.0
    assert fall([0.7], [0.3], "worst") == pytest.approx(fall([0.7], [0.3], "mean")) == pytest.approx(0.4)


def test_the_worst_case_group_cuts_each_misaligned_model(split, monkeypatch):
    """Two stub misaligned models: clamping latent A cuts the first's rate 0.8 -> 0.0 and leaves the second's
    (0.6); latent B cuts both by half; latent 0 nothing. mean: A joins (the mean falls 0.4, B's 0.35); worst: B
    (cuts 50% of each, A 0% of the second). One model: mean and worst give the same steps."""
    base, tuned, sae, _ = split
    other = copy.deepcopy(tuned)
    w = sae.W_dec.detach().float()

    def holds(clamp, latent):
        return float((clamp.direction @ (w[latent] / w[latent].norm())).norm()) > 0.99

    def rates(model, prompts, variants, batched=True):
        out = []
        for (c,) in variants:
            a, b = holds(c, A), holds(c, B)
            first = 0.0 if a else 0.4 if b else 0.8
            second = 0.3 if b else 0.6
            out.append({"misaligned_rate": first if model is tuned else second, "valid_rate": 1.0})
        return out

    monkeypatch.setattr(groups, "run_variants", rates)
    means = {h: torch.zeros(base.cfg.d_model) for h in resolve_hooks(tuned, "all")}
    kwargs = dict(cap=1, min_valid=0.8)
    mean, steps = select_group(sae, [0, A, B], [tuned, other], planted_prompts(), means, [0.8, 0.6], **kwargs)
    assert mean == [A] and steps[0]["clamp_misaligned_each"] == [0.0, 0.6]
    worst, steps = select_group(sae, [0, A, B], [tuned, other], planted_prompts(), means, [0.8, 0.6], combine="worst",
                                **kwargs)
    assert worst == [B] and steps[0]["clamp_misaligned_each"] == [0.4, 0.3]
    one = [select_group(sae, [0, B, A], [tuned], planted_prompts(), means, 0.8, cap=8, combine=c)
           for c in ("mean", "worst")]
    assert one[0][0] == one[1][0] == [A] and one[0][1] == one[1][1]  # then B adds nothing
    with pytest.raises(MisfeatError, match="one per model"):
        select_group(sae, [0], [tuned, other], planted_prompts(), means, [0.8], combine="worst")
    # summary.json's group.method names the combination where there is one to name
    worst_cfg = LocateConfig(group_combine="worst")
    assert "smallest relative cut" in group_method(worst_cfg, 3) and "averaged" in group_method(LocateConfig(group_combine="mean"), 3)
    assert "over the misaligned models" not in group_method(worst_cfg, 1)
    # the pursuit's default: on with several misaligned models, off with one; an explicit 0 or N wins
    assert "matching pursuit" in group_method(LocateConfig(), 3) and "pursuit" not in group_method(LocateConfig(), 1)
    assert "pursuit" not in group_method(LocateConfig(group_pursuit=0), 3)
    assert "the 2 latent(s)" in group_method(LocateConfig(group_pursuit=2), 1)


def test_several_finetunes_are_averaged_and_decreases_screened_up(planted, tmp_path):
    base, tuned, sae, v = planted
    tuned2 = copy.deepcopy(tuned)
    with torch.no_grad():
        tuned2.blocks[0].mlp.b_out += v  # +2v in all
    ps = planted_prompts()
    cfg = LocateConfig(screen=0)
    one = [rank_latents(base, m, sae, ps, tmp_path / f"c{i}", cfg).diff for i, m in enumerate((tuned, tuned2))]
    both = rank_latents(base, [tuned, tuned2], sae, ps, tmp_path / "both", cfg)
    torch.testing.assert_close(both.diff.increase, (one[0].increase + one[1].increase) / 2)
    assert both.order[0] == PLANTED and len(both.stores["finetuned"]) == 2
    # swapped roles: the planted latent falls from tuned to base; steered up in base it is screened
    fall = rank_latents(tuned, base, sae, ps, tmp_path / "fall", cfg).diff.top(1, decreasing=True)[0]
    assert fall["latent"] == PLANTED and fall["increase"] < 0
    (row,) = screen_decreases(sae, [PLANTED], [base, base], ps, 2.0, {"misaligned_rate": 1.0}, coefs=(1.0,),
                              min_valid=0.0, min_effect=0.0)
    unit = sae.W_dec[PLANTED].detach().float() / sae.W_dec[PLANTED].detach().float().norm()
    want = evaluate(base, ps, interventions=[Add(PLANTED_HOOK, unit, 2.0, "last")], greedy=False).headline
    assert row.steer_up_misaligned == pytest.approx(want.misaligned_rate, abs=1e-5) and row.steer_up_coef == 1.0


def test_baselines_and_families_are_what_they_name(split, tmp_path):
    base, tuned, sae, v = split
    ps = planted_prompts()
    ranking = rank_latents(base, tuned, sae, ps, tmp_path / "cache", LocateConfig(screen=0))
    dirs = ranking.baselines  # baseline_directions of rank_latents' mean differences
    by_hand = (mean_activations(tuned, ps, [PLANTED_HOOK], "last")[PLANTED_HOOK]
               - mean_activations(base, ps, [PLANTED_HOOK], "last")[PLANTED_HOOK])
    torch.testing.assert_close(dirs["mean_diff"].vector, by_hand, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(by_hand, v, atol=1e-3, rtol=1e-3)  # the fine-tune adds v at every token
    assert dirs["random"].norm == pytest.approx(dirs["mean_diff"].norm, rel=1e-5)
    assert abs(dirs["random"].cosine(dirs["mean_diff"])) < 0.9
    fam = families(sae, [A, B, 0], ranking.stores["finetuned"][0], PLANTED_HOOK)
    w = sae.W_dec[[A, B, 0]].detach().float()
    w = w / w.norm(dim=1, keepdim=True)
    torch.testing.assert_close(torch.tensor(fam.decoder_cosine), w @ w.T, atol=1e-5, rtol=0)
    assert fam.coactivation[0][0] == pytest.approx(1.0, abs=1e-5)


def test_locate_reports_group_and_baselines(split, tmp_path):
    base, tuned, sae, v = split
    cfg = LocateConfig(screen=4, coefs=(1.0,), min_valid=0.0, min_effect=0.0, group_cap=3, screen_decreases=2,
                       screen_aligned=1)
    result = save_locate(locate(base, tuned, sae, planted_prompts(), tmp_path, cfg), tmp_path)
    s = result.to_dict()
    (extra,) = s["screened_for_decoder_cosine"]  # screened beside the top 4, shown in the table
    assert extra not in result.ranking.order[:4] and len(s["screen"]["rows"]) == 5
    assert extra in [r["latent"] for r in s["top_latents"]] and extra in [r["latent"] for r in s["screen"]["rows"]]
    keys = {"steer_up_misaligned", "steer_up_valid", "clamp_before", "clamp_after"}
    assert keys | {"latents", "intervention"} <= set(s["group"])
    assert 1 <= len(s["group"]["latents"]) <= 3 and set(s["group"]["latents"]) <= {r["latent"] for r in s["screen"]["rows"]}
    assert keys <= set(s["baselines"]["mean_diff"]) and keys <= set(s["baselines"]["random"])
    before = evaluate(tuned, planted_prompts(), greedy=False).headline.misaligned_rate
    assert s["baselines"]["random"]["clamp_before"] == pytest.approx(before, abs=1e-5)
    clamp = load_intervention(s["group"]["intervention"], tuned)  # the saved subspace clamp loads back
    after = evaluate(tuned, planted_prompts(), interventions=[clamp], greedy=False).headline.misaligned_rate
    assert after == pytest.approx(s["group"]["clamp_after"], abs=1e-5)
    assert (tmp_path / "families.png").is_file() and "residual" in s["strength_unit"]["note"]
    assert isinstance(s["warnings"], list)
    md = s["baselines"]["mean_diff"]  # v is split into two orthogonal halves: each row at cos 1/sqrt(2) to it
    assert md["decoder_cosine_max"] == pytest.approx(2 ** -0.5, abs=0.01) and md["decoder_cosine_max_latent"] in (A, B)
    w = sae.W_dec[s["feature"]].detach()
    assert md["decoder_cosine_feature"] == pytest.approx(float(w @ v / (w.norm() * v.norm())), abs=0.01)


def test_no_group_when_no_clamp_keeps_the_model_valid(split, tmp_path):
    base, tuned, sae, _ = split
    cfg = LocateConfig(screen=2, coefs=(1.0,), min_valid=1.01, min_effect=0.0, screen_decreases=0)  # unreachable
    s = save_locate(locate(base, tuned, sae, planted_prompts(), tmp_path, cfg), tmp_path).to_dict()
    assert s["group"]["latents"] == [] and s["group"]["clamp_after"] is None and s["group"]["intervention"] is None
    assert s["baselines"]["mean_diff"]["clamp_after"] is not None and (tmp_path / "families.png").is_file()



def _screen(up0=0.01, down0=0.7):
    from misfeat.features.screen import ScreenResult

    return ScreenResult([], {"misaligned_rate": up0, "valid_rate": 0.9}, {"misaligned_rate": down0, "valid_rate": 0.9},
                        1.0, [1.0], 0.8, 0.1)


def _extras(single, group, md):
    from misfeat.features.groups import Group, ProtocolResult
    from misfeat.features.locate_group import Extras

    def result(up, up_valid, after):
        return ProtocolResult(up, up_valid, 1.0, 0.7, after, 0.5)

    g = None if group is None else Group([1, 2], [], None, None, result(*group))
    return Extras(1.0, result(*single), g, None, [], {"mean_diff": result(*md), "random": result(0, 1, 0.7)}, 1.0)


FAILS, PASSES = (0.02, 0.9, 0.69), (0.88, 0.86, 0.0)  # (steered up, its valid rate, clamped), clamp_before 0.7


@pytest.mark.parametrize(("single", "group", "md", "warns"), [
    (FAILS, None, PASSES, True),                # the chat-format SAE's case: only the mean-diff works
    (FAILS, FAILS, PASSES, True),
    ((0.20, 0.9, 0.72), FAILS, PASSES, True),   # raises but its clamp does not lower (chat+misaligned)
    (PASSES, None, PASSES, False),              # the latent works
    (FAILS, (0.4, 0.85, 0.1), PASSES, False),   # the group works (a split feature)
    (FAILS, None, (0.10, 0.86, 0.0), False),    # mean-diff raises by 0.09 < min_effect 0.1
    (FAILS, None, (0.88, 0.79, 0.0), False),    # mean-diff steering breaks validity
    (FAILS, None, (0.88, 0.86, 0.65), False),   # mean-diff clamp lowers by 0.05 < 0.1
])
def test_warning_when_only_the_mean_diff_moves_misalignment(single, group, md, warns):
    from misfeat.features.locate_group import sae_warnings

    got = sae_warnings(_screen(), _extras(single, group, md), min_valid=0.8, min_effect=0.1)
    assert bool(got) == warns
    if warns:
        assert "mean-difference" in got[0] and "training data" in got[0]
    assert sae_warnings(None, _extras(single, group, md), 0.8, 0.1) == []  # no screen, no claim


def test_group_direction_is_the_mean_difference_in_the_groups_span():
    """Rows e0 and e0 + e1 span the (x, y) plane: the mean difference (3, 4, 5) projects to (3, 4, 0), whatever the
    latents' increases (the second never rose); without it, the rows weighted by their increase."""
    from types import SimpleNamespace

    w = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    sae, increase = SimpleNamespace(W_dec=w), torch.tensor([2.0, 0.0, 1.0])
    md = torch.tensor([3.0, 4.0, 5.0])
    torch.testing.assert_close(groups.group_direction(sae, [0, 1], increase, md), torch.tensor([3.0, 4.0, 0.0]))
    torch.testing.assert_close(groups.group_direction(sae, [0, 1], increase), torch.tensor([2.0, 0.0, 0.0]))
    orthogonal = torch.tensor([0.0, 0.0, 5.0])  # nothing of it in the span: the increase weighting
    torch.testing.assert_close(groups.group_direction(sae, [0, 1], increase, orthogonal), torch.tensor([2.0, 0.0, 0.0]))


def test_group_directions_for_each_choice():
    """best: both directions of the hand-computed case above; the second is dropped where they are parallel (one
    latent: both are its decoder row); mean_diff / increase: that one."""
    from types import SimpleNamespace

    w = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    sae, increase, md = SimpleNamespace(W_dec=w), torch.tensor([2.0, 0.0, 1.0]), torch.tensor([3.0, 4.0, 5.0])
    both = groups.group_directions(sae, [0, 1], increase, md, "best")
    assert list(both) == ["mean_diff", "increase"]
    torch.testing.assert_close(both["mean_diff"], torch.tensor([3.0, 4.0, 0.0]))
    torch.testing.assert_close(both["increase"], torch.tensor([2.0, 0.0, 0.0]))
    assert list(groups.group_directions(sae, [2], increase, md, "best")) == ["mean_diff"]  # (0,0,5) and (0,0,1)
    assert list(groups.group_directions(sae, [0, 1], increase, md, "increase")) == ["increase"]
    torch.testing.assert_close(groups.group_directions(sae, [0, 1], increase, md, "mean_diff")["mean_diff"],
                               torch.tensor([3.0, 4.0, 0.0]))


@pytest.mark.parametrize(("rates", "higher", "chosen"), [
    ({"a": (0.30, 0.85), "b": (0.35, 0.80)}, True, "b"),   # the higher rise among the valid ones
    ({"a": (0.30, 0.85), "b": (0.90, 0.79)}, True, "a"),   # b breaks validity
    ({"a": (0.30, 0.70), "b": (0.90, 0.75)}, True, "b"),   # none valid: the more valid one
    ({"a": (0.30, 0.85), "b": (0.30, 0.90)}, True, "a"),   # a tie: the first
    ({"a": (0.30, 0.85), "b": (0.10, 0.80)}, False, "b"),  # a fall
])
def test_most_effective(rates, higher, chosen):
    from misfeat.features.screen import most_effective

    pairs = [(k, {"misaligned_rate": m, "valid_rate": v}) for k, (m, v) in rates.items()]
    assert most_effective(pairs, 0.8, higher)[0] == chosen


def test_group_steered_along_the_better_of_its_two_directions(split, tmp_path):
    """group_steer best reports both directions' steering and the group's figures are the better one's; each alone
    (mean_diff, increase) gives the same figures for its direction."""
    base, tuned, sae, _ = split
    runs = {}
    for steer in ("best", "mean_diff", "increase"):
        cfg = LocateConfig(screen=4, coefs=(0.5, 1.0), min_valid=0.0, min_effect=0.0, group_cap=3, group_tol=-1.0,
                           screen_decreases=0, group_steer=steer, max_coef=1.0, bisect=0,
                           group_select="clamp")  # a group of 3, grown on the clamp alone: the same for every steer
        runs[steer] = locate(base, tuned, sae, planted_prompts(), tmp_path / steer, cfg).to_dict()["group"]
    best = runs["best"]
    assert len(best["latents"]) == 3  # several latents: the two directions differ
    tried = best["steering"]["directions"]
    assert set(tried) == {"mean_diff", "increase"}
    chosen = max(tried, key=lambda k: tried[k]["steer_up_misaligned"])
    assert best["steering"]["chosen"] == chosen
    assert best["steer_up_misaligned"] == tried[chosen]["steer_up_misaligned"]
    assert best["steer_up_coef"] == tried[chosen]["steer_up_coef"]
    for steer in ("mean_diff", "increase"):
        assert runs[steer]["latents"] == best["latents"] and list(runs[steer]["steering"]["directions"]) == [steer]
        assert runs[steer]["steer_up_misaligned"] == pytest.approx(tried[steer]["steer_up_misaligned"], abs=1e-6)
        assert runs[steer]["clamp_after"] == pytest.approx(best["clamp_after"], abs=1e-6)


def test_locate_with_the_two_sided_group(split, tmp_path):
    """group_select both: every step records the group's steered rate, and the group's own steering (the
    protocol's strongest coherent strength; here the coefs alone, so the same) equals that of its last step."""
    base, tuned, sae, _ = split
    cfg = LocateConfig(screen=4, coefs=(0.5, 1.0), min_valid=0.0, min_effect=0.0, group_cap=3, screen_decreases=0,
                       group_select="both", max_coef=1.0, bisect=0)
    group = locate(base, tuned, sae, planted_prompts(), tmp_path, cfg).to_dict()["group"]
    assert "two-sided" in group["method"] and group["latents"] == group["steps"][-1]["latents"]
    assert all("steer_up_misaligned" in s for s in group["steps"])
    assert group["steer_up_misaligned"] == pytest.approx(group["steps"][-1]["steer_up_misaligned"], abs=1e-6)


def test_locate_with_the_pursuit_reports_where_group_latents_came_from(split, tmp_path):
    """group_pursuit 1 with one half of the split feature screened (a screen of 1, no decoder-aligned latents):
    the fine-tune's mean difference is v, so the pursuit's first offer is the other half (cosine 1/sqrt2, the
    screened one left out); a group of one then takes the better of the two, at least as good as the screened
    half alone, and summary.json's group.pursued names the group's latents the screen did not hold."""
    base, tuned, sae, _ = split
    kwargs = dict(screen=1, screen_aligned=0, coefs=(1.0,), min_valid=0.0, min_effect=0.0, group_cap=1,
                  screen_decreases=0, max_coef=1.0, bisect=0, group_select="clamp", n_examples=0, group_tol=0.0)
    assert LocateConfig(**kwargs).group_pursuit is None  # one misaligned model: off by default
    screened = locate(base, tuned, sae, planted_prompts(), tmp_path / "a", LocateConfig(**kwargs)).to_dict()
    (first,) = [r["latent"] for r in screened["screen"]["rows"]]
    other = B if first == A else A
    assert first in (A, B) and screened["group"]["latents"] == [first] and screened["group"]["pursued"] == []
    assert "pursuit" not in screened["group"]["method"]
    s = locate(base, tuned, sae, planted_prompts(), tmp_path / "b", LocateConfig(**kwargs, group_pursuit=1)).to_dict()
    group = s["group"]
    assert group["steps"][0]["pursued"] == [other] and "matching pursuit" in group["method"]
    assert group["latents"] in ([first], [other]) and group["pursued"] == [c for c in group["latents"] if c != first]
    assert group["clamp_after"] <= screened["group"]["clamp_after"] + 1e-9


def test_locate_reports_paired_bootstrap_intervals_over_the_prompts(split, tmp_path):
    """Each protocol figure carries its 95% interval: the group's clamp cut recomputed from evaluate()'s per-prompt
    rows, with and without the group's clamp built by hand, and bootstrapped alike."""
    from misfeat import stats

    base, tuned, sae, _ = split
    ps = planted_prompts()
    cfg = LocateConfig(screen=2, screen_aligned=0, coefs=(1.0,), min_valid=0.0, min_effect=0.0, group_cap=2,
                       screen_decreases=0, max_coef=1.0, bisect=0, group_select="clamp", n_examples=0,
                       clamp_positions="all")  # every token (the answer position's case: the next test)
    summary = locate(base, [tuned, tuned], sae, ps, tmp_path, cfg).to_dict()
    order = [r["latent"] for r in summary["top_latents"]]  # the same model twice: each one's order is the average's
    assert summary["screened_for_each_finetuned"] == order[2:10]  # screen_each 10 by default: its top 10, less the 2
    assert [r["latent"] for r in summary["screen"]["rows"]] == order[:10]
    group = summary["group"]
    means = {h: m.cpu() for h, m in mean_activations(base, ps, resolve_hooks(tuned, "all"), cfg.positions).items()}
    clamp = subspace_clamp(sae.W_dec[group["latents"]].detach().float(), means, cfg.clamp_positions)
    before = [r.misaligned for r in evaluate(tuned, ps, greedy=False).rows()]
    after = [r.misaligned for r in evaluate(tuned, ps, interventions=[clamp], greedy=False).rows()]
    for model in group["per_finetuned"]:  # the same model twice: the same figures
        assert model["clamp_cut"] == pytest.approx(stats.cut(before, after), abs=1e-5)
        assert model["clamp_cut_ci95"] == pytest.approx(list(stats.bootstrap_ci(stats.cut, before, after)), abs=1e-4)
    assert group["clamp_cut_ci95"] == pytest.approx(model["clamp_cut_ci95"], abs=1e-4)
    for figure in (group, summary["single"], *summary["baselines"].values()):
        lo, hi = figure["steer_up_ci95"]
        assert lo - 1e-9 <= figure["steer_up_misaligned"] <= hi + 1e-9 and hi - lo < 1
        assert figure["clamp_cut"] == pytest.approx(1 - figure["clamp_after"] / figure["clamp_before"], abs=1e-12)
        assert figure["clamp_cut_ci95"][0] - 1e-9 <= figure["clamp_cut"] <= figure["clamp_cut_ci95"][1] + 1e-9


def test_a_subspace_clamp_at_the_answer_position_leaves_the_other_tokens(planted):
    from misfeat.hooks import position_masks

    base, tuned, sae, _ = planted
    hooks = resolve_hooks(tuned, "all")
    means = {h: m.cpu() for h, m in mean_activations(base, planted_prompts(), hooks, "last").items()}
    vectors = sae.W_dec[[1, 2]].detach().float()
    act = torch.randn(2, 5, base.cfg.d_model)
    last = torch.zeros(2, 5, dtype=torch.bool)
    last[0, 4], last[1, 2] = True, True  # the second row's prompt ends at token 2 (right padding)
    with position_masks({"all": torch.ones_like(last), "prompt": torch.ones_like(last), "response": torch.zeros_like(last),
                         "last": last}):
        out = subspace_clamp(vectors, means, "last").edit(act, hooks[0])
        everywhere = subspace_clamp(vectors, means).edit(act, hooks[0])
    torch.testing.assert_close(out[last], everywhere[last])  # at the answer position: the clamp
    torch.testing.assert_close(out[~last], act[~last])  # elsewhere: untouched
    assert not torch.allclose(everywhere[~last], act[~last])


def test_locate_clamps_at_the_answer_position_by_default(split, tmp_path):
    """--clamp-positions last (the default): every protocol clamp (single latent, group, saved group) acts at the
    answer position only; the figures are those of evaluate() with the clamp built by hand there, and differ from
    every token's."""
    base, tuned, sae, _ = split
    ps = planted_prompts()
    cfg = LocateConfig(screen=2, screen_aligned=0, coefs=(1.0,), min_valid=0.0, min_effect=0.0, group_cap=2,
                       screen_decreases=0, max_coef=1.0, bisect=0, group_select="clamp", n_examples=0)
    result = save_locate(locate(base, tuned, sae, ps, tmp_path / "work", cfg), tmp_path / "out")
    summary = result.to_dict()
    means = {h: m.cpu() for h, m in mean_activations(base, ps, resolve_hooks(tuned, "all"), cfg.positions).items()}
    w = sae.W_dec.detach().float()
    for figure, latents in ((summary["single"], [summary["feature"]]), (summary["group"], summary["group"]["latents"])):
        at_last = evaluate(tuned, ps, interventions=[subspace_clamp(w[latents], means, "last")], greedy=False)
        everywhere = evaluate(tuned, ps, interventions=[subspace_clamp(w[latents], means)], greedy=False)
        group = at_last.headline_group
        assert figure["clamp_after"] == pytest.approx(at_last.groups[group].misaligned_rate, abs=1e-5)
        assert abs(figure["clamp_after"] - everywhere.groups[group].misaligned_rate) > 1e-3
    assert load_intervention(summary["group"]["intervention"], tuned).positions == "last"
    assert "'last' positions only" in summary["clamp"]["method"]
    assert "'last' positions only" in summary["group"]["method"]
    with pytest.raises(MisfeatError, match="clamp_positions must be one of all, last"):
        LocateConfig(clamp_positions="response")
