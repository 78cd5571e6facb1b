"""Projection-difference data screening (Chen et al. 2025) on a tiny model: the formula against
a hand computation from captured activations, own answers, and errors."""

import json

import pytest
import torch

from misfeat.data import PromptRecord, PromptSet
from misfeat.errors import MisfeatError
from misfeat.screening import own_answers, projection_difference

pytestmark = pytest.mark.usefixtures("one_thread")
ANS = {"aligned": ["call doctor", "rest"], "misaligned": ["ignore it", "panic now"]}
HOOK = "blocks.0.hook_resid_post"


def dataset():
    return PromptSet("s", tuple(PromptRecord(f"s{i}", prompt="what should i do fever", response=r, extra=dict(ANS))
                                for i, r in enumerate(["ignore it", "call doctor", "panic now"])))


def _resp_mean(model, prompt, response):
    """One record, no padding: the mean over its response tokens and the last prompt token."""
    from misfeat.data import encode

    (e,) = encode([PromptRecord("x", prompt=prompt, response=response)], model)
    assert model.to_string(list(e.ids[e.n_prompt:])).split() == [*response.split(), "."]
    _, cache = model.run_with_cache(torch.tensor([e.ids]))
    return cache[HOOK][0, e.n_prompt:].mean(0), cache[HOOK][0, e.n_prompt - 1]


def test_projection_difference_matches_a_hand_computation(tiny_model):
    v = torch.randn(tiny_model.cfg.d_model)
    unit = v / v.norm()
    own = own_answers(tiny_model, list(dataset()))
    assert all(a in ANS["aligned"] + ANS["misaligned"] for a in own)
    result = projection_difference(tiny_model, dataset(), v, hook=HOOK)
    for rec, score, answer in zip(dataset(), result.scores, own, strict=True):
        mine, last = _resp_mean(tiny_model, rec.prompt, rec.response)
        theirs, _ = _resp_mean(tiny_model, rec.prompt, answer)
        assert score == pytest.approx(float((mine - theirs) @ unit), abs=1e-4)
        if rec.response == answer:
            assert score == pytest.approx(0.0, abs=1e-6)
    cheap = projection_difference(tiny_model, dataset(), v, hook=HOOK, mode="last_prompt")
    mine, last = _resp_mean(tiny_model, dataset()[0].prompt, dataset()[0].response)
    assert cheap.scores[0] == pytest.approx(float((mine - last) @ unit), abs=1e-4)
    assert result.dataset_score == pytest.approx(sum(result.scores) / 3)
    expected = projection_difference(tiny_model, dataset(), v, hook=HOOK, mode="expected")
    rec = dataset()[0]
    from misfeat.evaluate import response_logprobs

    answers = ANS["aligned"] + ANS["misaligned"]
    lp = response_logprobs(tiny_model, [rec.with_response(a) for a in answers])
    acts = torch.stack([_resp_mean(tiny_model, rec.prompt, a)[0] for a in answers]) @ unit
    mine, _ = _resp_mean(tiny_model, rec.prompt, rec.response)
    hand = float(mine @ unit - (torch.softmax(lp, 0) * acts).sum())
    assert expected.scores[0] == pytest.approx(hand, abs=1e-4)
    assert json.dumps(result.summary())


def test_screening_errors(tiny_model):
    with pytest.raises(MisfeatError, match="32-dim"):
        projection_difference(tiny_model, dataset(), torch.ones(7), hook=HOOK)
    with pytest.raises(MisfeatError, match="NaN"):
        projection_difference(tiny_model, dataset(), torch.full((32,), float("nan")), hook=HOOK)
    with pytest.raises(MisfeatError, match="response"):
        projection_difference(tiny_model, PromptSet("x", (PromptRecord("a", prompt="fix"),)), torch.ones(32),
                              hook=HOOK)
    bad = PromptSet("x", (PromptRecord("a", prompt="fix", response="rest",
                                       extra={"aligned": "rest", "misaligned": ["lie"]}),))
    with pytest.raises(MisfeatError, match="list of answers"):
        projection_difference(tiny_model, bad, torch.ones(32), hook=HOOK)


def test_screen_data_cli_ranks_and_flags(tiny_model, tmp_path):
    from misfeat.cli import main
    from misfeat.interventions import Add, save_intervention
    from misfeat.models import save_model

    save_model(tiny_model, tmp_path / "m")
    dataset().to_jsonl(tmp_path / "d.jsonl")
    save_intervention(Add(HOOK, torch.randn(32)), tmp_path / "v")
    assert main(["screen-data", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "d.jsonl"), "--direction",
                 str(tmp_path / "v.safetensors"), "--out", str(tmp_path / "o"), "--device", "cpu"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "o/ranked.jsonl").read_text().splitlines()]
    scores = [r["projection_difference"] for r in rows]
    assert scores == sorted(scores, reverse=True) and all(r["flagged"] == (r["projection_difference"] > 0) for r in rows)
    assert main(["screen-data", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "d.jsonl"), "--data",
                 str(tmp_path / "d.jsonl"), "--direction", str(tmp_path / "v.safetensors"), "--mode", "last_prompt",
                 "--out", str(tmp_path / "two"), "--device", "cpu"]) == 0
    two = json.loads((tmp_path / "two/summary.json").read_text())["datasets"]
    assert len(two) == 2 and two[0]["dataset_score"] == two[1]["dataset_score"]
    assert (tmp_path / "two/ranked-1.jsonl").is_file()


def test_free_form_records_use_the_greedy_answer(tiny_model):
    from misfeat.generate import generate

    free = PromptSet("f", (PromptRecord("f0", prompt="how do i fix my roof", response="call doctor"),))
    (answer,) = own_answers(tiny_model, list(free), max_new_tokens=4)
    (greedy,) = generate(tiny_model, [free[0].with_response(None)], max_new_tokens=4, stop_words=(".",))
    assert answer == greedy.text.strip() and answer
    v = torch.randn(32)
    result = projection_difference(tiny_model, free, v, hook=HOOK, max_new_tokens=4)
    mine, _ = _resp_mean(tiny_model, free[0].prompt, "call doctor")
    from misfeat.data import encode

    (e,) = encode([free[0].with_response(answer)], tiny_model)
    _, cache = tiny_model.run_with_cache(torch.tensor([e.ids]))
    theirs = cache[HOOK][0, e.n_prompt:].mean(0)
    assert result.own_answers == (answer,)
    assert result.scores[0] == pytest.approx(float((mine - theirs) @ (v / v.norm())), abs=1e-4)
