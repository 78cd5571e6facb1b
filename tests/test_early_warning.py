"""features/early_warning.py on the planted case: fine-tunes adding f x v at the SAE's hook, so the
planted latent's increase grows with f; the separation test against the control's range."""

import copy

import pytest
import torch

from misfeat.cli import main
from misfeat.data import tokenize
from misfeat.errors import MisfeatError
from misfeat.evaluate import evaluate
from misfeat.features.early_warning import (
    EarlyWarning,
    WarningRow,
    early_warning,
    plot_early_warning,
)
from tests.conftest import PLANTED, PLANTED_HOOK, planted_prompts

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_feature_increase_and_rate_are_measured_per_finetune(planted, tmp_path):
    base, _, sae, v = planted
    models = {}
    for f, scale in ((0, 0.0), (0, 0.01), (5, 0.5), (100, 1.0)):
        m = copy.deepcopy(base)
        with torch.no_grad():
            m.blocks[0].mlp.b_out += scale * v
        models.setdefault(f, []).append(m)
    specs = {f: [f"{f}-{i}" for i in range(len(ms))] for f, ms in models.items()}
    by_spec = {f"{f}-{i}": m for f, ms in models.items() for i, m in enumerate(ms)}
    result = early_warning(base, specs, sae, PLANTED, planted_prompts(), load=by_spec.__getitem__)
    def latent_mean(model):  # by hand: the SAE latent at the last prompt token, from run_with_cache
        batch = tokenize(planted_prompts(), model, with_response=False)
        _, cache = model.run_with_cache(batch.tokens)
        return float(sae.encode(cache[PLANTED_HOOK][batch.last_mask])[:, PLANTED].mean().detach())

    for row in result.rows:
        want = latent_mean(by_spec[row.model]) - latent_mean(base)
        assert row.activation_increase == pytest.approx(want, abs=1e-4)
        want = evaluate(by_spec[row.model], planted_prompts(), greedy=False).headline.misaligned_rate
        assert row.misaligned_rate == pytest.approx(want, abs=1e-6)
    assert result.first_separation("activation_increase") == 5.0
    assert set(result.to_dict()) >= {"feature_separates_at", "behaviour_separates_at", "rows", "test"}
    assert plot_early_warning(result, tmp_path / "ew.png").is_file()


def test_separation_needs_every_seed_above_the_control_range():
    def rows(values):
        return [WarningRow(f, s, "", v, 0.0, 1.0) for f, vs in values.items() for s, v in enumerate(vs)]

    r = EarlyWarning(rows({0: [0.0, 0.2], 2: [0.1, 0.5], 5: [0.3, 0.25], 10: [1.0, 1.0]}), 0, 0.0, 0.0)
    assert r.first_separation("activation_increase") == 5.0  # 2%: one seed inside the control's range
    assert EarlyWarning(rows({0: [0.0, 0.9], 5: [0.3, 0.5]}), 0, 0.0, 0.0).first_separation(
        "activation_increase") is None
    with pytest.raises(MisfeatError, match="control"):
        EarlyWarning(rows({5: [0.3]}), 0, 0.0, 0.0).first_separation("activation_increase")


@pytest.mark.parametrize("argv, message", [
    (["--latent", "1", "--fractions", "5,10"], "must include 0"),
    (["--latent", "1", "--fractions", "0,3"], "em-frac fine-tunes exist"),
    ([], "give the feature"),
])
def test_early_warning_refuses_bad_input_before_work(argv, message, tmp_path, capsys):
    assert main(["early-warning", "--sae", str(tmp_path), *argv, "--out", str(tmp_path / "o")]) != 0
    assert message in capsys.readouterr().err


def test_locate_refuses_an_empty_finetuned_list(tmp_path, capsys):
    assert main(["locate", "--base", "x", "--finetuned", ",", "--sae", str(tmp_path), "--prompts", "p",
                 "--out", str(tmp_path / "o")]) != 0
    assert "empty list" in capsys.readouterr().err
