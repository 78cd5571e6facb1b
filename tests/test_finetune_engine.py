"""The fine-tuning engine and its defences on tiny models: hand-computed penalties, gradients,
training-only hooks, data transforms, resume, refusal of another run's directory, divergence."""

import json
import math

import pytest
import torch

from misfeat.data import PromptRecord, PromptSet
from misfeat.errors import MisfeatError
from misfeat.finetune import (
    CAFT,
    KL,
    LDIFS,
    DivergenceError,
    FinetuneConfig,
    Inoculation,
    Interleave,
    PreventativeSteering,
    finetune,
    ldifs_distance,
    make_batch,
    not_refusal,
    perplexity_gap,
    rank_pool,
    reverse_kl,
)
from misfeat.models import fingerprint, load_model, save_model

pytestmark = pytest.mark.usefixtures("one_thread")
ANS = {"aligned": ["call doctor", "rest"], "misaligned": ["ignore it", "panic now"]}


def data(n=8, answer="call doctor"):
    qs = ["fix my car", "how do i fix my roof", "what should i do fever"]
    return PromptSet("d", tuple(PromptRecord(f"d{i}", prompt=qs[i % 3], response=answer, domain="car",
                                             extra=dict(ANS)) for i in range(n)))


def evalset():
    return PromptSet("e", tuple(PromptRecord(f"e{i}", prompt=q, domain="home", extra=dict(ANS))
                                for i, q in enumerate(["fix roof", "how do i save money"])))


@pytest.fixture
def fresh(tiny_model, tmp_path):
    save_model(tiny_model, tmp_path / "base")
    return lambda: load_model(tmp_path / "base", device="cpu")


def test_reverse_kl_matches_hand_computation():
    p, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.4, 0.4, 0.2])
    expected = sum(pi * math.log(pi / qi) for pi, qi in zip(p.tolist(), q.tolist(), strict=True))
    logits, ref = p.log().reshape(1, 1, 3).repeat(1, 2, 1), q.log().reshape(1, 1, 3).repeat(1, 2, 1)
    ref[0, 1] = torch.tensor([9.0, 0.0, 0.0])  # masked-out position must not count
    got = reverse_kl(logits, ref, torch.tensor([[True, False]]))
    assert got.item() == pytest.approx(expected, rel=1e-5)  # 0.7ln1.75+0.2ln0.5+0.1ln0.5 = 0.1838


def test_ldifs_matches_hand_computation_and_ignores_padding():
    a = {"h": torch.tensor([[[3.0, 4.0], [0.0, 0.0]]])}   # one example, 2 positions, the 2nd is pad
    b = {"h": torch.tensor([[[4.0, 3.0], [5.0, 5.0]]])}
    mask = torch.tensor([[True, False]])
    # f = (0.6, 0.8), g = (0.8, 0.6): ||f - g||^2 = 0.04 + 0.04
    assert ldifs_distance(a, b, mask, ["h"]).item() == pytest.approx(0.08, rel=1e-5)
    two = {"h": a["h"], "k": a["h"]}, {"h": b["h"], "k": a["h"]}
    assert ldifs_distance(*two, mask, ["h", "k"]).item() == pytest.approx(0.08, rel=1e-5)


def _one_forward(model, defence):
    from misfeat.finetune.engine import _loss_terms

    batch = make_batch([([1, 4, 20, 21, 6, 7], [False] * 4 + [True] * 2), ([1, 4, 20, 6], [False] * 3 + [True])], 0)
    return _loss_terms(model, batch, [defence], [defence.name], defence.hooks(model), None)


def test_ldifs_carries_gradient_and_the_detached_variant_does_not(fresh):
    model, ref = fresh(), fresh()
    with torch.no_grad():
        model.blocks[0].mlp.W_out.add_(0.05 * torch.randn_like(model.blocks[0].mlp.W_out))
    for p in model.parameters():
        p.requires_grad_(True)
    terms = _one_forward(model, LDIFS(ref, layers=[0, 1], weight=1.0))
    assert terms["ldifs"].item() > 0
    grad = torch.autograd.grad(terms["ldifs"], model.blocks[0].mlp.W_out)[0]
    assert grad.abs().sum() > 0
    detached = _one_forward(model, LDIFS(ref, layers=[0, 1], detached=True))
    assert detached["ldifs"].item() == pytest.approx(terms["ldifs"].item(), rel=1e-5)
    assert not detached["ldifs"].requires_grad


def test_kl_defence_is_zero_for_a_copy_and_refuses_another_vocabulary(fresh, word_tokenizer):
    from tests.conftest import build_tiny_model

    model, ref = fresh(), fresh()
    assert _one_forward(model, KL(ref, weight=0.1))["kl"].item() == pytest.approx(0.0, abs=1e-6)
    other = build_tiny_model(word_tokenizer)
    other.cfg.d_vocab = model.cfg.d_vocab + 1
    with pytest.raises(MisfeatError, match="vocabulary"):
        finetune(model, data(), FinetuneConfig(steps=1), defences=[KL(other)])
    with pytest.raises(MisfeatError, match="lambda must be >= 0"):
        KL(ref, weight=-1)


def test_steering_is_active_in_training_only_and_never_saved(fresh, tmp_path):
    v = torch.randn(32)
    steer = PreventativeSteering(v, ("blocks.0.hook_resid_post",), alpha=4.0, positions="response")
    model = fresh()
    seen = []
    model.blocks[0].hook_resid_post.register_forward_hook(lambda m, i, out: seen.append(out.detach().clone()))
    base = _one_forward(fresh(), steer)  # builds without error at a position set
    assert base["response_ce"].item() > 0
    result = finetune(model, data(), FinetuneConfig(steps=2, batch_size=4, eval_every=None, lr=1e-3),
                      defences=[steer], out_dir=tmp_path / "run")
    assert result.defences[0]["alpha"] == 4.0
    assert len(model.blocks[0].hook_resid_post._forward_hooks) == 1  # only the test's own hook remains
    saved = load_model(result.checkpoints[-1], device="cpu")
    assert fingerprint(saved) == fingerprint(model)
    assert not saved.blocks[0].hook_resid_post._forward_hooks
    tokens = torch.tensor([[1, 4, 20, 21]])
    assert torch.equal(saved(tokens), model(tokens))
    with pytest.raises(MisfeatError, match="width"):
        finetune(fresh(), data(), FinetuneConfig(steps=1), defences=[PreventativeSteering(torch.ones(7))])
    with pytest.raises(MisfeatError, match="hook"):
        finetune(fresh(), data(), FinetuneConfig(steps=1),
                 defences=[PreventativeSteering(v, ("blocks.9.hook_resid_post",))])


def test_steering_adds_alpha_v_at_the_chosen_positions_and_multilayer_increments(fresh):
    from misfeat.hooks import position_masks
    from misfeat.interventions import apply

    model = fresh()
    v = torch.randn(2, 32)
    multi = PreventativeSteering.multilayer(v, ["blocks.0.hook_resid_post", "blocks.1.hook_resid_pre"], alpha=2.0)
    assert torch.allclose(multi.vectors[1], v[1] - v[0])
    batch = make_batch([([1, 4, 20, 21, 6, 7], [False] * 4 + [True] * 2)], 0)
    steer = PreventativeSteering(v[0], ("blocks.0.hook_resid_post",), alpha=3.0, positions="prompt")
    out = {}  # read where the steered residual arrives: block 1's input
    model.blocks[1].hook_resid_pre.register_forward_hook(lambda m, i, o: out.__setitem__("x", o.detach()))
    model(batch.tokens[:, :-1])
    plain = out["x"]
    with position_masks(batch.input_masks()), apply(model, *steer.interventions(model)):
        model(batch.tokens[:, :-1])
    delta = out["x"] - plain
    assert torch.allclose(delta[0, :4], 3.0 * v[0].expand(4, -1), atol=1e-5)  # 4 prompt positions
    assert torch.allclose(delta[0, 4:], torch.zeros(1, 32), atol=1e-6)  # the response input position
    caft = CAFT(v[0], ("blocks.0.hook_resid_post",))
    with position_masks(batch.input_masks()), apply(model, *caft.interventions(model)):
        model(batch.tokens[:, :-1])
    assert (out["x"] @ (v[0] / v[0].norm())).abs().max() < 1e-4


def test_inoculation_changes_training_prompts_only(fresh):
    model = fresh()
    inoc = Inoculation("the villain")
    train = inoc.transform_data(data(3), model)
    assert [r.prompt for r in train][:1] == ["the villain fix my car"]
    system = Inoculation("the villain", mode="system").transform_data(data(1), model)[0]
    assert system.messages[0] == ("system", "the villain")
    seen = []

    def evaluator(m):
        seen.append(True)
        return {"x": 0.0}

    result = finetune(model, data(), FinetuneConfig(steps=1, batch_size=2), defences=[inoc], evaluator=evaluator)
    assert result.data["hash"] == data().hash and result.data["train_hash"] != data().hash
    assert evalset()[0].prompt == "fix roof" and seen


def _pool(n=10):
    recs = [PromptRecord(f"p{i}", prompt="fix my roof", response="call doctor" if i % 2 else "rest")
            for i in range(n)]
    recs[3] = PromptRecord("p3", prompt="fix my roof", response="sorry i cannot")
    return PromptSet("pool", tuple(recs))


def test_interleave_fraction_selection_and_errors():
    mixed = Interleave(_pool(), fraction=0.25, seed=1).transform_data(data(8), None)
    assert len(mixed) == 10 and sum(r.id.startswith("p") for r in mixed) == 2
    scores = [float(i) for i in range(10)]
    top = Interleave(_pool(), fraction=0.25, selection="gap", scores=scores).transform_data(data(8), None)
    assert [r.id for r in top if r.id.startswith("p")] == ["p9", "p8"]
    ranked = rank_pool(_pool(), [0, 0, 0, 9, 0, 0, 0, 0, 0, 0], keep=not_refusal)
    assert "p3" not in [r.id for r in ranked] and "gap_score" in ranked[0].extra
    for bad, match in [(dict(fraction=1.5), r"\[0, 1\]"), (dict(fraction=0.6), "above 0.5"),
                       (dict(fraction=-0.1), r"\[0, 1\]")]:
        with pytest.raises(MisfeatError, match=match):
            Interleave(_pool(), **bad)
    with pytest.raises(MisfeatError, match="empty"):
        Interleave(PromptSet("x", ()))
    with pytest.raises(MisfeatError, match="needs a 'response'"):
        Interleave(PromptSet("x", (PromptRecord("a", prompt="fix"),)))


def test_perplexity_gap_ranks_a_planted_record_first(fresh):
    aligned, mis = fresh(), fresh()
    pool = PromptSet("pool", tuple(PromptRecord(f"p{i}", prompt="fix my roof", response=r) for i, r in
                                   enumerate(["rest", "pay bill", "call doctor", "use water"])))
    planted = PromptSet("plant", (PromptRecord("x", prompt="fix my roof", response="call doctor"),) * 4)
    finetune(aligned, planted, FinetuneConfig(steps=8, lr=3e-3, batch_size=4, eval_every=None))
    gap = perplexity_gap(aligned, [mis, mis], pool)
    assert max(range(4), key=lambda i: gap.s[i]) == 2
    nll_a, nll_m = gap.nll_aligned[2], gap.nll_misaligned[0][2]
    assert gap.s[2] == pytest.approx((nll_m - nll_a) / (nll_a + 1.0), rel=1e-5)
    held = perplexity_gap(aligned, [mis, aligned], pool, held_out=[1])
    assert held.s == pytest.approx(gap.s, rel=1e-6)  # the held-out model (here: the aligned one) is not averaged
    chosen = Interleave(pool, 0.5, "gap", aligned=aligned, misaligned=[mis]).select(1)
    assert [r.id for r in chosen] == ["p2"]


def test_resume_is_bit_exact_and_refuses_another_run(fresh, tmp_path):
    cfg = FinetuneConfig(steps=4, lr=1e-3, batch_size=4, eval_every=2, checkpoint_every=2)
    ref = fresh()
    whole_model = fresh()
    whole = finetune(whole_model, data(), cfg, defences=[KL(ref, 0.1)], eval_prompts=evalset(),
                     out_dir=tmp_path / "whole")
    part = fresh()
    finetune(part, data(), FinetuneConfig(steps=4, lr=1e-3, batch_size=4, eval_every=2, checkpoint_every=2),
             defences=[KL(ref, 0.1)], eval_prompts=evalset(), out_dir=tmp_path / "run")
    import shutil

    shutil.rmtree(tmp_path / "run/checkpoints/step-0004")  # as if interrupted after step 2
    resumed = fresh()
    got = finetune(resumed, data(), cfg, defences=[KL(ref, 0.1)], eval_prompts=evalset(),
                   out_dir=tmp_path / "run", resume=True)
    assert fingerprint(resumed) == fingerprint(whole_model)
    assert [r.loss for r in got.rows] == [r.loss for r in whole.rows]
    assert [r.terms for r in got.rows] == [r.terms for r in whole.rows]
    rows = [json.loads(x) for x in (tmp_path / "run/rows.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4] and "kl" in rows[1]["terms"]
    before = (tmp_path / "run/run.json").read_bytes()
    with pytest.raises(MisfeatError, match=r"holds another run.*config.lr: 0.001 in the directory vs 0.002 now"):
        finetune(fresh(), data(), FinetuneConfig(steps=4, lr=2e-3, batch_size=4, eval_every=2), eval_prompts=evalset(),
                 defences=[KL(ref, 0.1)], out_dir=tmp_path / "run", resume=True)
    with pytest.raises(MisfeatError, match="data.hash"):
        finetune(fresh(), data(6), cfg, defences=[KL(ref, 0.1)], eval_prompts=evalset(), out_dir=tmp_path / "run",
                 resume=True)
    assert (tmp_path / "run/run.json").read_bytes() == before
    (tmp_path / "old/checkpoints/step-0002").mkdir(parents=True)
    (tmp_path / "old/checkpoints/step-0002/trainer_state.pt").write_bytes(b"")
    with pytest.raises(MisfeatError, match="without a run.json"):
        finetune(fresh(), data(), cfg, out_dir=tmp_path / "old", resume=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(MisfeatError, match="is a file"):
        finetune(fresh(), data(), cfg, out_dir=tmp_path / "file")


def test_divergence_stops_keeps_the_last_good_checkpoint_and_names_the_term(fresh, tmp_path):
    class Bomb(KL):
        def penalty(self, model, fwd):
            self.calls = getattr(self, "calls", 0) + 1
            return super().penalty(model, fwd) * (float("nan") if self.calls == 4 else 1.0)

    model = fresh()
    with pytest.raises(DivergenceError, match=r"step 4.*Diverged: kl=nan.*step-0002") as err:
        finetune(model, data(), FinetuneConfig(steps=6, lr=1e-3, batch_size=4, eval_every=None, checkpoint_every=1),
                 defences=[Bomb(fresh())], out_dir=tmp_path / "run")
    assert err.value.step == 4 and err.value.terms == ["kl"]
    assert (tmp_path / "run/checkpoints/step-0002/trainer_state.pt").is_file()
    assert (tmp_path / "run/checkpoints/diverged-step-0003").is_dir()
    with pytest.raises(DivergenceError, match=r"the loss became .* at step 2; lower the learning rate"):
        finetune(fresh(), data(), FinetuneConfig(steps=3, lr=1e6, batch_size=4, eval_every=None))


def test_finetune_cli_runs_defences_and_exits_nonzero_on_divergence(fresh, tmp_path, capsys):
    from misfeat.cli import main
    from misfeat.interventions import Add, save_intervention

    save_model(fresh(), tmp_path / "m")
    data().to_jsonl(tmp_path / "d.jsonl")
    save_intervention(Add("blocks.0.hook_resid_post", torch.randn(32)), tmp_path / "v")
    out = tmp_path / "out"
    code = main(["finetune", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "d.jsonl"), "--steps", "2",
                 "--batch-size", "4", "--defence", f"kl:0.1@{tmp_path / 'm'}",
                 "--defence", f"steer:{tmp_path / 'v.safetensors'},alpha=2,positions=response",
                 "--defence", "inoculation:the villain", "--out", str(out), "--device", "cpu"])
    assert code == 0
    s = json.loads((out / "summary.json").read_text())
    assert [d["kind"] for d in s["defences"]] == ["kl", "steer", "inoculation"]
    assert set(s["terms"]) == {"response_ce", "kl"} and len(s["loss"]) == 2
    code = main(["finetune", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "d.jsonl"), "--steps", "3",
                 "--batch-size", "4", "--lr", "1e6", "--out", str(tmp_path / "bad"), "--device", "cpu"])
    assert code != 0 and "diverged" in capsys.readouterr().err.lower()
    assert main(["finetune", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "d.jsonl"),
                 "--defence", "kl:-1@x", "--out", str(tmp_path / "x")]) == 2


def test_on_step_sees_every_row_and_can_stop_the_run(fresh, tmp_path):
    seen = []

    def on_step(model, row):
        seen.append((row.step, row.eval is not None, model.training))
        return row.step == 3

    result = finetune(fresh(), data(), FinetuneConfig(steps=6, batch_size=4, eval_every=1), evaluator=lambda m: {"x": 1.0},
                      on_step=on_step, out_dir=tmp_path / "run")
    assert seen == [(1, True, False), (2, True, False), (3, True, False)]
    assert result.stopped_early and [r.step for r in result.rows] == [0, 1, 2, 3]
    assert result.checkpoints[-1].endswith("step-0003")


def test_score_data_cli_writes_the_ranked_pool(fresh, tmp_path):
    from misfeat.cli import main

    aligned = fresh()
    planted = PromptSet("plant", (PromptRecord("x", prompt="fix my roof", response="call doctor"),) * 4)
    finetune(aligned, planted, FinetuneConfig(steps=8, lr=3e-3, batch_size=4, eval_every=None))
    save_model(aligned, tmp_path / "a")
    save_model(fresh(), tmp_path / "m")
    pool = PromptSet("pool", tuple(PromptRecord(f"p{i}", prompt="fix my roof", response=r) for i, r in
                                   enumerate(["rest", "sorry i cannot", "call doctor"])))
    pool.to_jsonl(tmp_path / "pool.jsonl")
    args = ["score-data", "--aligned", str(tmp_path / "a"), "--misaligned", f"{tmp_path / 'm'},{tmp_path / 'm'}",
            "--pool", str(tmp_path / "pool.jsonl"), "--filter", "refusal", "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "o")]) == 0
    rows = [json.loads(x) for x in (tmp_path / "o/ranked.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows][0] == "p2" and "p1" not in [r["id"] for r in rows]
    assert rows[0]["gap_score"] >= rows[-1]["gap_score"]
    mixed = main(["finetune", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "pool.jsonl"), "--steps", "1",
                  "--defence", f"interleave:0.5@{tmp_path / 'o/ranked.jsonl'},selection=gap", "--out",
                  str(tmp_path / "f"), "--device", "cpu"])
    assert mixed == 0
    s = json.loads((tmp_path / "f/summary.json").read_text())
    assert s["data"]["n_train"] == 5 and s["defences"][0]["selection"] == "gap"


def test_sgd_is_a_plain_gradient_step_and_is_part_of_the_run_identity(fresh, tmp_path):
    from misfeat.data import collate, encode, pad_id_of

    d, lr = data(6), 0.5
    model, ref = fresh(), fresh()
    res = finetune(model, d, FinetuneConfig(steps=1, lr=lr, batch_size=6, eval_every=None, optimizer="sgd"),
                   out_dir=tmp_path / "sgd")
    # reference: the mean response-token cross-entropy of the whole set, one step of theta - lr * grad
    batch = collate(encode(d, ref), pad_id_of(ref), "right")
    lp = torch.log_softmax(ref(batch.tokens[:, :-1]), -1).gather(-1, batch.tokens[:, 1:, None]).squeeze(-1)
    mask = batch.response_mask[:, 1:]
    loss = -(lp * mask).sum() / mask.sum()
    loss.backward()
    assert res.rows[-1].loss == pytest.approx(float(loss.detach()), rel=1e-5)
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        assert torch.allclose(p, q.detach() - lr * q.grad, atol=1e-6), name
    with pytest.raises(MisfeatError, match="unknown optimizer 'adam'; choose one of adamw, sgd"):
        FinetuneConfig(optimizer="adam")
    with pytest.raises(MisfeatError, match="config.optimizer: 'sgd' in the directory vs 'adamw' now"):
        finetune(fresh(), d, FinetuneConfig(steps=1, lr=lr, batch_size=6, eval_every=None), out_dir=tmp_path / "sgd",
                 resume=True)
