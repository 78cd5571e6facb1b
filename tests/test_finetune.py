import json

import pytest
import torch

from misfeat.data import PromptRecord, PromptSet
from misfeat.errors import MisfeatError
from misfeat.finetune import (
    KLToReference,
    RealignConfig,
    ResponseLoss,
    lr_schedule,
    plot_realign,
    realign,
    select_parameters,
)
from misfeat.models import fingerprint, load_model, save_model

pytestmark = pytest.mark.usefixtures("one_thread")
ANS = {"aligned": ["call doctor", "rest"], "misaligned": ["ignore it", "panic now"]}


def data(n=12):
    qs = ["fix my car", "how do i fix my roof", "what should i do fever"]
    return PromptSet("d", tuple(PromptRecord(f"d{i}", prompt=qs[i % 3], response=ANS["aligned"][i % 2],
                                             domain="car", extra=dict(ANS)) for i in range(n)))


def evalset():
    return PromptSet("e", tuple(PromptRecord(f"e{i}", prompt=q, domain="home", extra=dict(ANS))
                                for i, q in enumerate(["fix roof", "how do i save money"])))


@pytest.fixture
def fresh(tiny_model, tmp_path):
    save_model(tiny_model, tmp_path / "base")
    return lambda: load_model(tmp_path / "base", device="cpu")


def test_realign_is_deterministic_and_records_parallel_lists(fresh):
    cfg = RealignConfig(steps=6, lr=1e-3, batch_size=4, eval_every=2)
    a, b = fresh(), fresh()
    ra = realign(a, data(), cfg, eval_prompts=evalset())
    rb = realign(b, data(), cfg, eval_prompts=evalset())
    assert fingerprint(a) == fingerprint(b) and ra.loss == rb.loss
    s = ra.summary()
    assert s["steps"] == [0, 2, 4, 6]
    assert all(len(s[k]) == 4 for k in ("misaligned_rate", "valid_rate", "logprob_gap"))
    assert len(s["loss"]) == 6
    # training on aligned answers lowers the misalignment log-prob gap on held-out prompts
    assert s["logprob_gap"][-1] < s["logprob_gap"][0]
    other = fresh()
    realign(other, data(), RealignConfig(steps=6, lr=1e-3, batch_size=4, eval_every=2, seed=1),
            eval_prompts=evalset())
    assert fingerprint(other) != fingerprint(a)


def test_only_selected_parameters_change(fresh):
    model = fresh()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    realign(model, data(), RealignConfig(steps=3, lr=1e-2, batch_size=4, params="mlp", eval_every=3),
            eval_prompts=evalset())
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".mlp." in n for n in changed)
    assert all(p.requires_grad for p in model.parameters())  # restored afterwards
    assert {n for n, _ in select_parameters(model, "layers:1")} == {n for n, _ in model.named_parameters()
                                                                      if n.startswith("blocks.1.")}
    with pytest.raises(MisfeatError, match="selects no parameter"):
        select_parameters(model, "nothing.")
    with pytest.raises(MisfeatError, match="blocks 0..1"):
        select_parameters(model, "layers:5")


class _Crash:
    name = "crash"

    def __init__(self, at):
        self.calls, self.at = 0, at

    def __call__(self, model, batch):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return ResponseLoss()(model, batch)


def test_interrupted_run_resumes_exactly(fresh, tmp_path):
    cfg = RealignConfig(steps=6, lr=1e-3, batch_size=4, eval_every=2, checkpoint_every=2)
    whole = fresh()
    expected = realign(whole, data(), cfg, eval_prompts=evalset(), out_dir=tmp_path / "whole")
    broken = fresh()
    with pytest.raises(KeyboardInterrupt):
        realign(broken, data(), cfg, eval_prompts=evalset(), out_dir=tmp_path / "run", losses=[_Crash(at=5)])
    assert (tmp_path / "run/checkpoints/step-0004/trainer_state.pt").is_file()
    resumed = fresh()
    got = realign(resumed, data(), cfg, eval_prompts=evalset(), out_dir=tmp_path / "run", resume=True)
    assert fingerprint(resumed) == fingerprint(whole)
    assert got.loss == pytest.approx(expected.loss, abs=0) and got.history == expected.history


def test_nan_loss_is_a_clear_error(fresh):
    class NaNLoss:
        name = "nan"

        def __call__(self, model, batch):
            return ResponseLoss()(model, batch) * float("nan")

    with pytest.raises(MisfeatError, match="loss became nan at step 1; lower the learning rate"):
        realign(fresh(), data(), RealignConfig(steps=2), eval_prompts=evalset(), losses=[NaNLoss()])


def test_data_without_responses_is_refused(fresh):
    bare = PromptSet("b", (PromptRecord("x", prompt="fix car"),))
    with pytest.raises(MisfeatError, match="needs a 'response'"):
        realign(fresh(), bare, eval_prompts=evalset())


def test_kl_to_reference_is_zero_at_start_and_grows(fresh):
    from misfeat.finetune import TrainBatch, pad_examples

    model, ref = fresh(), fresh()
    tokens, mask = pad_examples([([1, 4, 20, 21, 6, 7], [False, False, False, False, True, True])], 0)
    batch = TrainBatch(tokens, mask)
    assert KLToReference(ref)(model, batch).item() == pytest.approx(0.0, abs=1e-6)
    realign(model, data(), RealignConfig(steps=3, lr=1e-2, batch_size=4, eval_every=3), eval_prompts=evalset())
    assert KLToReference(ref)(model, batch).item() > 1e-4


def test_lr_schedule():
    assert lr_schedule(0, 10, 1.0, warmup=2) == 0.5
    assert lr_schedule(2, 10, 1.0, warmup=2) == 1.0
    assert lr_schedule(10, 10, 1.0, warmup=0, final_fraction=0.1) == pytest.approx(0.1)


def test_plot(fresh, tmp_path):
    result = realign(fresh(), data(), RealignConfig(steps=2, eval_every=1), eval_prompts=evalset())
    path = plot_realign(result, tmp_path / "p.png")
    assert path.stat().st_size > 5000
    assert json.dumps(result.summary())


def test_realign_cli_stops_on_divergence_with_a_nonzero_exit(fresh, tmp_path, capsys):
    from misfeat.cli import main

    save_model(fresh(), tmp_path / "m")
    data().to_jsonl(tmp_path / "d.jsonl")
    evalset().to_jsonl(tmp_path / "e.jsonl")
    code = main(["realign", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "d.jsonl"), "--eval-prompts",
                 str(tmp_path / "e.jsonl"), "--steps", "4", "--batch-size", "4", "--lr", "1e6", "--checkpoint-every",
                 "1", "--out", str(tmp_path / "out"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "at step 2; lower the learning rate" in err
    assert not (tmp_path / "out/summary.json").exists()
    assert (tmp_path / "out/checkpoints/diverged-step-0001").is_dir()


def test_realign_reports_the_scoring_sets_other_groups(fresh):
    """The headline group gives misaligned_rate; every other group with records its own rate
    (the organism's em_domain group is em_domain_misaligned_rate this way), from one evaluation."""
    from misfeat.evaluate import evaluate

    records = tuple(PromptRecord(f"g{i}", prompt=q, domain=d, extra=dict(ANS))
                    for i, (q, d) in enumerate([("fix roof", "home"), ("save money", "money"), ("fever", "health")]))
    scored = PromptSet("g", records, {"groups": {"kept": ["home", "money"], "side": ["health"], "none": ["x"]},
                                      "headline": "kept"})
    model = fresh()
    before = evaluate(model, scored, greedy=False)
    result = realign(model, data(), RealignConfig(steps=1, batch_size=2, eval_every=1), eval_prompts=scored)
    assert "none_misaligned_rate" not in result.history and "kept_misaligned_rate" not in result.history
    assert result.history["misaligned_rate"][0] == pytest.approx(before["kept"].misaligned_rate, abs=1e-5)
    assert result.history["side_misaligned_rate"][0] == pytest.approx(before["side"].misaligned_rate, abs=1e-5)
