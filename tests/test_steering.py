import json

import pytest
import torch

from misfeat.cli import main
from misfeat.data import PromptRecord, PromptSet
from misfeat.errors import MisfeatError
from misfeat.features.directions import Direction, save_direction
from misfeat.interventions import Add
from misfeat.models import save_model
from misfeat.steering import plot_sweep, steer_sweep

HOOK = "blocks.0.hook_resid_post"
ANS = {"aligned": ["call doctor", "rest"], "misaligned": ["ignore it", "panic now"]}


def prompts():
    return PromptSet("p", tuple(PromptRecord(f"q{i}", prompt=q, domain=d, extra=dict(ANS)) for i, (q, d) in
                                enumerate([("fix my car", "car"), ("how do i fix my roof", "home"),
                                           ("fever", "health")])),
                     {"groups": {"heldout": ["car", "home"], "em_domain": ["health"]}, "headline": "heldout"})


def test_sweep_rows_follow_coefficients(tiny_model, tmp_path):
    v = torch.randn(tiny_model.cfg.d_model) * 4
    result = steer_sweep(tiny_model, Add(HOOK, v, 1.0, "last"), [0.0, 1.0, 3.0], prompts())
    assert [r.coef for r in result.rows] == [0.0, 1.0, 3.0] and result.group == "heldout"
    assert result.rows[0].logprob_gap != result.rows[2].logprob_gap
    assert len({r["coef"] for r in result.samples}) == 3
    assert plot_sweep(result, tmp_path / "plot.png").stat().st_size > 5000


@pytest.fixture
def saved(tiny_model, tmp_path):
    save_model(tiny_model, tmp_path / "model")
    path = prompts().to_jsonl(tmp_path / "prompts.jsonl")
    v = torch.randn(tiny_model.cfg.d_model) * 4
    direction = save_direction(Direction(HOOK, v), tmp_path / "dir")
    return tmp_path, path, direction


def test_steer_cli_add(saved, capsys):
    tmp, prompts_file, direction = saved
    out = tmp / "out"
    assert main(["steer", "--model", str(tmp / "model"), "--direction", str(direction), "--op", "add",
                 "--coefs", "0,2", "--positions", "last", "--prompts", str(prompts_file), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [r["coef"] for r in summary["rows"]] == [0.0, 2.0]
    assert set(summary["rows"][0]) >= {"coef", "misaligned_rate", "valid_rate", "logprob_gap"}
    assert (out / "plot.png").is_file() and (out / "samples.jsonl").read_text().strip()
    assert (out / "intervention.safetensors").is_file()
    assert "misaligned_rate" in capsys.readouterr().out
    # coefficients count typical residual norms at the hook (the same unit as locate's screen)
    from misfeat.models import load_model
    from misfeat.steering import residual_scale

    model = load_model(tmp / "model", device="cpu")
    expected = residual_scale(model, str(prompts_file), HOOK, "last")
    assert summary["residual_norm_unit"] == pytest.approx(expected, rel=1e-5)


def test_steer_cli_ablate_with_reference_gives_one_row(saved):
    tmp, prompts_file, direction = saved
    out = tmp / "abl"
    assert main(["steer", "--model", str(tmp / "model"), "--direction", str(direction), "--hook", "all",
                 "--op", "ablate", "--reference", str(tmp / "model"), "--prompts", str(prompts_file),
                 "--out", str(out), "--json"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["rows"]) == 1
    assert isinstance(summary["intervention"]["value"], dict) and len(summary["intervention"]["value"]) == 3


def test_steer_cli_raw_vector_needs_hook(saved, tiny_model, capsys):
    tmp, prompts_file, _ = saved
    torch.save(torch.randn(tiny_model.cfg.d_model), tmp / "raw.pt")
    args = ["steer", "--model", str(tmp / "model"), "--direction", str(tmp / "raw.pt"), "--op", "add", "--coefs", "1",
            "--prompts", str(prompts_file)]
    assert main(args) == 2
    assert "pass --hook" in capsys.readouterr().err
    assert main([*args, "--hook", HOOK]) == 0


def test_steer_cli_wrong_width_is_clear(saved, capsys):
    tmp, prompts_file, _ = saved
    save_direction(Direction(HOOK, torch.randn(7)), tmp / "narrow")
    assert main(["steer", "--model", str(tmp / "model"), "--direction", str(tmp / "narrow.safetensors"), "--op",
                 "add", "--coefs", "1", "--prompts", str(prompts_file)]) == 2
    assert "width" in capsys.readouterr().err


def test_clamp_needs_an_sae(saved, capsys):
    tmp, prompts_file, direction = saved
    assert main(["steer", "--model", str(tmp / "model"), "--direction", str(direction), "--op", "clamp",
                 "--prompts", str(prompts_file)]) == 2
    assert "sets an SAE latent" in capsys.readouterr().err


def test_add_needs_coefs(saved, capsys):
    tmp, prompts_file, direction = saved
    assert main(["steer", "--model", str(tmp / "model"), "--direction", str(direction), "--op", "add",
                 "--prompts", str(prompts_file)]) == 2
    assert "needs --coefs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["steer", "--model", str(tmp / "model"), "--direction", str(direction), "--op", "add",
              "--coefs", "1,two"])
    assert "expected comma-separated float values" in capsys.readouterr().err


def test_evaluate_under_interventions_equals_applying_them(tiny_model):
    from misfeat.evaluate import evaluate
    from misfeat.interventions import apply

    torch.manual_seed(0)
    add = Add(HOOK, torch.randn(tiny_model.cfg.d_model) * 4, 2.0, "last")
    with apply(tiny_model, add):
        expected = evaluate(tiny_model, prompts(), greedy=False)
    got = evaluate(tiny_model, prompts(), interventions=[add], greedy=False)
    plain = evaluate(tiny_model, prompts(), greedy=False)
    assert got.headline.logprob_gap == pytest.approx(expected.headline.logprob_gap, abs=1e-6)
    assert got.headline.logprob_gap != pytest.approx(plain.headline.logprob_gap, abs=1e-4)
    assert not any(h._forward_hooks for h in tiny_model.hook_dict.values())  # removed afterwards


def test_make_intervention_and_clamp_to_reference(tiny_model, word_tokenizer, tmp_path):
    import numpy as np

    from misfeat.interventions import Ablate, read_vector
    from misfeat.steering import clamp_to_reference, make_intervention, mean_activations
    from tests.conftest import build_tiny_model

    v = torch.randn(tiny_model.cfg.d_model)
    np.save(tmp_path / "v.npy", v.numpy())
    vector, hook, source = read_vector(tmp_path / "v.npy", HOOK)
    assert torch.equal(vector, v) and hook == HOOK and source["kind"] == "direction"
    ablate, _ = make_intervention("ablate", direction=tmp_path / "v.npy", hook=HOOK, positions="last")
    assert isinstance(ablate, Ablate) and ablate.value is None
    reference = build_tiny_model(word_tokenizer, seed=3)
    clamped = clamp_to_reference(ablate, tiny_model, reference, prompts())
    mean = mean_activations(reference, prompts(), [HOOK], "last")[HOOK]
    assert clamped.value == {HOOK: pytest.approx(float(mean @ (v / v.norm())), abs=1e-5)}
    with pytest.raises(MisfeatError, match="exactly one feature"):
        make_intervention("add")
    with pytest.raises(MisfeatError, match="clamp sets an SAE latent"):
        make_intervention("clamp", direction=v, hook=HOOK)


def test_steering_strengths_count_typical_residual_norms(tiny_model):
    from misfeat.steering import in_residual_units, residual_scale

    v = torch.randn(tiny_model.cfg.d_model) * 7
    add = in_residual_units(Add(HOOK, v, 1.0, "last"), tiny_model, prompts())
    scale = residual_scale(tiny_model, prompts(), HOOK, "last")
    assert float(add.vector.norm()) == pytest.approx(scale, rel=1e-5)
    assert torch.allclose(add.vector / add.vector.norm(), v / v.norm(), atol=1e-6) and add.scale == 1.0
    with pytest.raises(MisfeatError, match="one hook"):
        in_residual_units(Add([HOOK, "blocks.1.hook_resid_post"], v, 1.0), tiny_model, prompts())


def test_steer_is_the_cli_in_one_call(tiny_model, word_tokenizer):
    from misfeat.steering import SteerConfig, residual_scale, steer
    from tests.conftest import build_tiny_model

    v = torch.randn(tiny_model.cfg.d_model)
    result = steer(tiny_model, SteerConfig(op="add", coefs=(0.0, 1.0), positions="last"), direction=v, hook=HOOK,
                   prompts=prompts())
    assert [r.coef for r in result.sweep.rows] == [0.0, 1.0] and result.to_dict()["op"] == "add"
    assert result.residual_norm_unit == pytest.approx(residual_scale(tiny_model, prompts(), HOOK, "last"), rel=1e-5)
    reference = build_tiny_model(word_tokenizer, seed=4)
    clamped = steer(tiny_model, SteerConfig(op="ablate"), direction=v, hook="all", prompts=prompts(),
                    reference=reference)
    assert len(clamped.sweep.rows) == 1 and isinstance(clamped.intervention.value, dict)
    with pytest.raises(MisfeatError, match="needs --coefs"):
        SteerConfig(op="add")
    with pytest.raises(MisfeatError, match="reference model sets the single value"):
        steer(tiny_model, SteerConfig(op="ablate", coefs=(0.0,)), direction=v, hook=HOOK, reference=reference)
