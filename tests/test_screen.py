"""features/screen.py on the planted case: every number of a screen row equals the evaluation
it stands for, computed here by hand from the public operators."""

import pytest
import torch

from misfeat.evaluate import evaluate
from misfeat.features.screen import causal_screen, strongest
from misfeat.interventions import Ablate, Add, resolve_hooks
from misfeat.steering import mean_activations, residual_scale
from tests.conftest import PLANTED, PLANTED_HOOK, planted_prompts

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_screen_row_is_the_evaluations_it_names(planted):
    base, tuned, sae, _ = planted
    ps = planted_prompts()
    result = causal_screen(sae, [PLANTED], base, tuned, ps, coefs=(1.0,), positions="last", min_valid=0.0,
                           min_effect=0.0)
    row = result.rows[0]
    scale = residual_scale(base, ps, PLANTED_HOOK, "last")
    unit = sae.W_dec[PLANTED].detach().float() / sae.W_dec[PLANTED].detach().float().norm()
    assert result.scale == pytest.approx(scale) and row.latent == PLANTED
    up = evaluate(base, ps, interventions=[Add(PLANTED_HOOK, unit, scale, "last")], greedy=False).headline
    down = evaluate(tuned, ps, interventions=[Add(PLANTED_HOOK, unit, -scale, "last")], greedy=False).headline
    assert (row.steer_up_coef, row.steer_down_coef) == (pytest.approx(scale), pytest.approx(-scale))
    assert row.steer_up_misaligned == pytest.approx(up.misaligned_rate, abs=1e-6)
    assert row.steer_down_misaligned == pytest.approx(down.misaligned_rate, abs=1e-6)
    hooks = resolve_hooks(tuned, "all")
    means = mean_activations(base, ps, hooks, "last")
    clamp = Ablate("all", unit, {h: float(means[h] @ unit) for h in hooks}, "last")  # the answer position, by default
    clamped = evaluate(tuned, ps, interventions=[clamp], greedy=False).headline
    assert row.clamp_misaligned == pytest.approx(clamped.misaligned_rate, abs=1e-6)
    everywhere = causal_screen(sae, [PLANTED], base, tuned, ps, coefs=(1.0,), min_valid=0.0, min_effect=0.0,
                               clamp_positions="all").rows[0]
    clamp = Ablate("all", unit, {h: float(means[h] @ unit) for h in hooks}, "all")
    assert everywhere.clamp_misaligned == pytest.approx(
        evaluate(tuned, ps, interventions=[clamp], greedy=False).headline.misaligned_rate, abs=1e-6)
    assert everywhere.clamp_misaligned != pytest.approx(row.clamp_misaligned, abs=1e-4)  # the two differ here
    base_rate = evaluate(base, ps, greedy=False).headline.misaligned_rate
    assert result.base_aligned["misaligned_rate"] == pytest.approx(base_rate, abs=1e-6)
    assert row.raises == (up.misaligned_rate >= base_rate)  # min_effect 0, min_valid 0


def test_a_latent_must_move_both_ways_to_pass(planted):
    base, tuned, sae, _ = planted
    result = causal_screen(sae, [PLANTED, 0], base, tuned, planted_prompts(), coefs=(0.5,), min_valid=0.0,
                           min_effect=2.0)  # no rate can move by 2
    assert result.passed() == [] and result.best() is None
    assert [r.latent for r in result.rows] == [PLANTED, 0]
    assert set(result.summary()) >= {"rows", "scale", "coefs", "base_aligned", "base_misaligned"}
    torch.testing.assert_close(torch.tensor(result.coefs), torch.tensor([0.5]))


def test_strongest_doubles_the_strength_while_the_model_stays_valid():
    """Rates fall in validity as the strength grows (valid = 1 - 0.05 c, misaligned = 0.1 c): from (0.5, 1, 2) the
    sweep goes on to 4 (valid 0.8, kept) and 8 (valid 0.6, refused), one batched call per round; an item invalid
    already at 2 is not extended; without max_coef the grid is all."""
    calls = []

    def run(todo):
        calls.append(list(todo))
        slope = {0: 0.05, 1: 0.15}
        return [{"valid_rate": 1 - slope[j] * c, "misaligned_rate": 0.1 * c} for j, c in todo]

    (c0, r0), (c1, r1) = strongest(run, 2, (0.5, 1.0, 2.0), 0.8, True, max_coef=8.0)
    assert (c0, r0["misaligned_rate"]) == (4.0, pytest.approx(0.4))  # 8 breaks validity (0.6 < 0.8)
    assert (c1, r1["misaligned_rate"]) == (1.0, pytest.approx(0.1))  # 2 breaks validity (0.7)
    assert calls[1:] == [[(0, 4.0)], [(0, 8.0)]] and len(calls[0]) == 6
    calls.clear()
    assert strongest(run, 2, (0.5, 1.0, 2.0), 0.8, True)[0][0] == 2.0 and len(calls) == 1
    assert strongest(run, 1, (0.5, 1.0, 2.0), 0.8, True, max_coef=3.0)[0][0] == 3.0  # capped at max_coef
    low, _ = strongest(run, 1, (0.5, 1.0, 2.0), 0.8, False, max_coef=8.0)[0]
    assert low == 0.5  # the side that wants the rate low takes the weakest setting here


def test_strongest_bisects_between_the_last_valid_strength_and_the_next():
    """Item 1 (valid = 1 - 0.15 c) is valid at 1 (0.85), not at 2 (0.70): bisection tries 1.5 (0.775, invalid),
    then 1.25 (0.8125, valid), the strongest; item 0 is valid at 4 (0.8), not at 8: 6 and 5 are both invalid."""
    calls = []

    def run(todo):
        calls.append(list(todo))
        slope = {0: 0.05, 1: 0.15}
        return [{"valid_rate": 1 - slope[j] * c, "misaligned_rate": 0.1 * c} for j, c in todo]

    (c0, _), (c1, r1) = strongest(run, 2, (0.5, 1.0, 2.0), 0.8, True, max_coef=8.0, bisect=2)
    assert (c0, c1, r1["misaligned_rate"]) == (4.0, 1.25, pytest.approx(0.125))
    assert calls[-2:] == [[(0, 6.0), (1, 1.5)], [(0, 5.0), (1, 1.25)]]
    calls.clear()
    assert strongest(run, 1, (0.5, 1.0, 2.0), 0.8, True, max_coef=None, bisect=0)[0][0] == 2.0 and len(calls) == 1


def test_the_screen_extends_its_strengths_to_what_evaluation_gives(planted):
    base, tuned, sae, _ = planted
    ps = planted_prompts()
    result = causal_screen(sae, [PLANTED], base, tuned, ps, coefs=(1.0,), min_valid=0.0, min_effect=0.0,
                           max_coef=4.0)  # min_valid 0: every strength is valid, so 1, 2 and 4 are tried
    row, scale = result.rows[0], residual_scale(base, ps, PLANTED_HOOK, "last")
    unit = sae.W_dec[PLANTED].detach().float() / sae.W_dec[PLANTED].detach().float().norm()
    up = {c: evaluate(base, ps, interventions=[Add(PLANTED_HOOK, unit, c * scale, "last")], greedy=False).headline
          for c in (1.0, 2.0, 4.0)}
    best = max(up, key=lambda c: up[c].misaligned_rate)
    assert row.steer_up_coef == pytest.approx(best * scale)
    assert row.steer_up_misaligned == pytest.approx(up[best].misaligned_rate, abs=1e-6)
    assert result.summary()["max_coef"] == 4.0
