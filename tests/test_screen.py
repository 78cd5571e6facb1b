"""features/screen.py on the planted case: every number of a screen row equals the evaluation
it stands for, computed here by hand from the public operators."""

import pytest
import torch

from misfeat.evaluate import evaluate
from misfeat.features.screen import causal_screen
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
    clamp = Ablate("all", unit, {h: float(means[h] @ unit) for h in hooks}, "all")
    clamped = evaluate(tuned, ps, interventions=[clamp], greedy=False).headline
    assert row.clamp_misaligned == pytest.approx(clamped.misaligned_rate, abs=1e-6)
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
