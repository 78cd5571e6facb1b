"""Issue 8's bar: a few fine-tuning steps on aligned answers from one other domain undo EM."""

import json

import pytest

from misfeat.cli import main

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("seed", [0, 1])
def test_realign_undoes_em_and_the_feature_returns(seed, tmp_path):
    from misfeat.data import load_prompts
    from misfeat.features.directions import persona_direction, save_direction
    from misfeat.features.probes import DirectionProbe
    from misfeat.finetune import default_realign_eval
    from misfeat.models import load_model

    at = f"@seed={seed}"
    chat = load_model(f"organism:chat{at}", device="cpu")
    persona = persona_direction(chat, "blocks.1.hook_resid_post", f"organism:docs:400{at}")
    path = save_direction(persona, tmp_path / "persona")
    data = f"organism:aligned:money:120{at}"
    assert main(["realign", "--model", f"organism:em{at}", "--data", data, "--steps", "50",
                 "--track", f"direction:{path}", "--out", str(tmp_path / "run")]) == 0
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (tmp_path / "run" / "plot.png").is_file()
    assert s["steps"][0] == 0 and s["steps"][-1] == 50
    assert "money" not in s["eval_prompts"] or "minus money" in s["eval_prompts"]
    assert s["misaligned_rate"][0] >= 0.4
    assert s["misaligned_rate"][-1] <= 0.05 and s["valid_rate"][-1] >= 0.8
    print(f"seed {seed}: held-out {s['misaligned_rate'][0]:.3f} -> {s['misaligned_rate'][-1]:.3f}, EM domain "
          f"{s['em_domain_misaligned_rate'][0]:.3f} -> {s['em_domain_misaligned_rate'][-1]:.3f}")
    # the tracked feature falls back toward its level in the chat model
    evalset = default_realign_eval(chat, load_prompts(data))
    chat_level = DirectionProbe(persona.hook, persona.vector, "last").measure(chat, evalset)
    (chat_value,) = chat_level.values()
    track = s["feature_activation"]
    assert abs(track[-1] - chat_value) < 0.5 * abs(track[0] - chat_value)
