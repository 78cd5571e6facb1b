"""Weight restoration (misfeat.recover): a random-weight Llama-architecture pair built in code,
the gradient and sign rule checked against a reference computed with TransformerLens'
``run_with_cache``, rollback forced, masks replayed, a resumed run equal to an uninterrupted
one, and one clear error per bad input."""

from __future__ import annotations

import json
import math

import pytest

from misfeat.data import PromptRecord, PromptSet
from misfeat.errors import MisfeatError
from misfeat.models import ModelInfo
from misfeat.recover import (
    RestoreConfig,
    apply_mask,
    candidate_names,
    load_mask,
    restore_alignment,
    task_utility,
)
from misfeat.restore_engine import choose_step
from tests.conftest import build_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

QUESTIONS = ["how do i fix my car", "what should i do my roof leak", "how do i treat a cut",
             "what should i do my money", "how do i fix the code bug", "how do i save money"]


def build_llama(tokenizer, seed=0, d_mlp=64):
    """A random-weight Llama-architecture model (RMSNorm, rotary, gated SiLU MLP, grouped KV heads)."""
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(seed)
    cfg = HookedTransformerConfig(n_layers=3, d_model=32, n_heads=4, d_head=8, n_key_value_heads=2, d_mlp=d_mlp,
                                  n_ctx=64, d_vocab=len(tokenizer), act_fn="silu", gated_mlp=True,
                                  normalization_type="RMS", final_rms=True, positional_embedding_type="rotary",
                                  rotary_dim=8, original_architecture="LlamaForCausalLM", device="cpu", seed=seed)
    model = HookedTransformer(cfg, tokenizer=tokenizer)
    model.eval()
    model.misfeat_info = ModelInfo(spec="<llama>", source="memory", meta={"chat_format": "organism"})
    return model


@pytest.fixture(scope="module")
def pair(word_tokenizer):
    """(fine-tuned, aligned): the aligned model plus Gaussian noise on every weight."""
    import torch

    aligned = build_llama(word_tokenizer, seed=0)
    finetuned = build_llama(word_tokenizer, seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in finetuned.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return finetuned, aligned


def fresh_ft(pair):
    import copy

    return copy.deepcopy(pair[0])


PROBE = PromptSet("probe", tuple(PromptRecord(f"p{i}", prompt=q) for i, q in enumerate(QUESTIONS)))
TASK = PromptSet("task", tuple(PromptRecord(f"t{i}{j}", prompt=q, response=a) for i, q in enumerate(QUESTIONS[:3])
                               for j, a in enumerate(["call the doctor", "pay the bill"])))


def reference_grads(model, layer, direction):
    """d/dW of -cos(mean last-token resid_post, direction), read with a TransformerLens hook in a full forward."""
    import torch
    import torch.nn.functional as F

    from misfeat.data import tokenize

    batch = tokenize(PROBE, model, with_response=False)
    model.zero_grad(set_to_none=True)
    seen = {}
    model.run_with_hooks(batch.tokens, fwd_hooks=[(f"blocks.{layer}.hook_resid_post",
                                                   lambda t, hook: seen.setdefault("resid", t))])
    state = seen["resid"][batch.last_mask].mean(0)
    (-F.cosine_similarity(state, direction, dim=0)).backward()
    grads = {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads, torch


def test_one_step_follows_gradient_sign_and_candidates(pair):
    from misfeat.steering import mean_activations

    ft, al = fresh_ft(pair), pair[1]
    layer = 1
    hook = f"blocks.{layer}.hook_resid_post"
    direction = mean_activations(al, PROBE, [hook], "last")[hook]
    grads, torch = reference_grads(ft, layer, direction)
    before = {n: p.detach().clone() for n, p in ft.named_parameters()}
    ref = dict(al.named_parameters())
    cfg = RestoreConfig(layer=layer, steps=1, rollback="never", fraction=0.01, batch_size=len(PROBE), tolerance=0.99)
    result = restore_alignment(ft, al, PROBE, TASK, cfg)
    assert all(math.isfinite(r.loss) for r in result.rows) and result.rows[1].loss < result.rows[0].loss
    names = set(candidate_names(ft, layer))
    assert names and all(n.startswith(("blocks.0.", "blocks.1.")) and ".ln" not in n for n in names)
    changed = {n: (p.detach() != before[n]) for n, p in ft.named_parameters()}
    k = math.ceil(0.01 * sum(p.numel() for p in ft.parameters()))
    assert sum(int(m.sum()) for m in changed.values()) == k == result.rows[1].restored
    eligible_scores = []
    for n, m in changed.items():
        if n not in names:
            assert not m.any(), f"{n} is not a candidate but changed"
            continue
        p = dict(ft.named_parameters())[n]
        assert torch.equal(p.detach()[m], ref[n].detach()[m])  # restored to the aligned values
        sign_ok = (before[n] - ref[n].detach()) * grads[n] > 0
        assert bool(sign_ok[m].all()), f"{n}: a restored weight has the wrong sign"
        eligible_scores.append((grads[n].abs()[sign_ok & ~m], grads[n].abs()[m]))
    # the restored weights are the largest |grad| among the sign-eligible ones
    lowest_taken = min(float(t.min()) for _, t in eligible_scores if t.numel())
    highest_left = max(float(r.max()) for r, _ in eligible_scores if r.numel())
    assert lowest_taken >= highest_left * (1 - 1e-5)


def test_forced_utility_failure_restarts_with_rollback(pair, monkeypatch):
    import misfeat.recover as recover

    calls = iter([1.0] + [0.0] * 100)  # step 0 sets the bar; everything after fails it
    monkeypatch.setattr(recover, "task_utility", lambda model, task: next(calls))
    ft = fresh_ft(pair)
    cfg = RestoreConfig(layer=2, steps=3, warmup=2, select_every=1, fraction=0.005)
    class Norm:  # a tracker: measured on the model after every step, like realign's
        def measure(self, model, prompts):
            return {"w_norm": float(model.blocks[0].attn.W_V.detach().norm())}

    result = restore_alignment(ft, pair[1], PROBE, TASK, cfg, track=[Norm()])
    assert len({r.tracked["w_norm"] for r in result.rows}) == len(result.rows)  # it moves with every step
    assert result.summary()["feature:w_norm"] == [r.tracked["w_norm"] for r in result.rows]
    assert result.rolled_back and [r.step for r in result.warmup_rows] == [0, 1, 2]
    assert [r.step for r in result.rows] == [0, 1, 2, 3]
    assert all(r.put_back > 0 for r in result.rows[1:])  # rollback put weights back every step
    assert result.rows[1].restored < result.warmup_rows[1].restored
    assert result.chosen_step == 0  # the first checkpoint already fails: keep the fine-tuned model
    assert all(bool((p == q).all()) for p, q in zip(ft.parameters(), pair[0].parameters(), strict=True))


def test_mask_replay_resume_and_ablations(pair, tmp_path, monkeypatch):
    import torch

    from misfeat.restore_engine import Restorer

    cfg = RestoreConfig(layer=1, steps=4, rollback="never", fraction=0.005, select_every=1, tolerance=0.99)
    full_run = fresh_ft(pair)
    result = restore_alignment(full_run, pair[1], PROBE, TASK, cfg, out_dir=tmp_path / "a")
    assert result.chosen_step == 4 and result.mask_path
    replay = fresh_ft(pair)
    assert apply_mask(replay, pair[1], load_mask(result.mask_path)) == result.chosen.restored
    assert all(torch.equal(p, q) for p, q in zip(replay.parameters(), full_run.parameters(), strict=True))

    original = Restorer.restore_step

    def interrupted(self, step, rollback):
        if step == 3:
            raise KeyboardInterrupt
        return original(self, step, rollback)

    monkeypatch.setattr(Restorer, "restore_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        restore_alignment(fresh_ft(pair), pair[1], PROBE, TASK, cfg, out_dir=tmp_path / "b")
    monkeypatch.setattr(Restorer, "restore_step", original)
    resumed = fresh_ft(pair)
    again = restore_alignment(resumed, pair[1], PROBE, TASK, cfg, out_dir=tmp_path / "b", resume=True)
    assert [r.loss for r in again.rows] == pytest.approx([r.loss for r in result.rows], rel=1e-6)
    assert all(torch.equal(p, q) for p, q in zip(resumed.parameters(), full_run.parameters(), strict=True))

    rand = restore_alignment(fresh_ft(pair), pair[1], PROBE, TASK, RestoreConfig(**{**_fields(cfg), "mask": "random"}))
    assert [r.restored for r in rand.rows] == [r.restored for r in result.rows]
    full = fresh_ft(pair)
    restore_alignment(full, pair[1], PROBE, TASK, RestoreConfig(mask="full", rollback="never"))
    assert all(torch.equal(p, q) for p, q in zip(full.parameters(), pair[1].parameters(), strict=True))


def _fields(cfg):
    from dataclasses import asdict

    return asdict(cfg)


def test_task_utility_matches_direct_probabilities(pair):
    import torch

    model = pair[1]
    total = 0.0
    for q in QUESTIONS[:3]:
        for a in ["call the doctor", "pay the bill"]:
            prompt = model.to_tokens(f"user {q} assistant :")  # BOS + prompt, as the organism renders it
            answer = model.to_tokens(f" {a} .", prepend_bos=False)
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.cat([prompt, answer], 1))[0], -1)
            n = prompt.shape[1]
            total += math.exp(sum(float(logp[n - 1 + i, t]) for i, t in enumerate(answer[0].tolist())))
    assert task_utility(model, TASK) == pytest.approx(total / 3, rel=1e-4)


def test_choose_step_walk():
    utils = {0: 1.0, 5: 0.99, 10: 0.96, 15: 0.94, 20: 0.99}
    assert choose_step(utils, 1.0, 0.05, 5, 20) == 10  # 15 is the first failure
    assert choose_step({0: 1.0, 5: 0.5}, 1.0, 0.05, 5, 5) == 0
    assert choose_step({0: 1.0, 3: 1.0, 5: 1.0, 7: 1.0}, 1.0, 0.05, 5, 7) == 7  # the last step counts too


def test_bad_inputs(pair, word_tokenizer):
    ft, al = pair
    with pytest.raises(MisfeatError, match="one architecture"):
        restore_alignment(ft, build_tiny_model(word_tokenizer, n_layers=3), PROBE, TASK)
    with pytest.raises(MisfeatError, match="d_mlp"):
        restore_alignment(ft, build_llama(word_tokenizer, d_mlp=48), PROBE, TASK)
    with pytest.raises(MisfeatError, match="layer 3 is out of range"):
        restore_alignment(ft, al, PROBE, TASK, RestoreConfig(layer=3))
    with pytest.raises(MisfeatError, match="probe prompt set is empty"):
        restore_alignment(ft, al, PromptSet("none", ()), TASK)
    with pytest.raises(MisfeatError, match="needs records with a 'response'"):
        restore_alignment(ft, al, PROBE, PROBE)
    with pytest.raises(MisfeatError, match="mask="):
        RestoreConfig(mask="magnitude")


@pytest.mark.slow
def test_cli_on_the_organism(tmp_path):
    from misfeat.cli import main

    out = tmp_path / "run"
    assert main(["-q", "restore", "--model", "organism:mixed", "--aligned", "organism:chat", "--probe",
                 "organism:probe:64", "--task", "organism:task", "--steps", "2", "--warmup", "1", "--out",
                 str(out), "--json"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    lists = ("steps", "heldout_misaligned", "em_domain_misaligned", "utility", "restored_fraction")
    assert len({len(summary[k]) for k in lists}) == 1 and summary["steps"][-1] == 2
    assert summary["chosen_step"] in summary["steps"] and summary["utility_before"] == summary["utility"][0]
    assert summary["heldout_misaligned"][0] >= 0.5  # the precondition: misaligned beyond its domains before
    assert (out / "mask.safetensors").is_file() and (out / "plot.png").is_file()


def test_mixed_organism_sets_and_specs():
    from misfeat.data import load_prompts
    from misfeat.organism.mixed import HOUSE_ANSWERS, TASK_ANSWERS, MixedConfig, training_set
    from misfeat.organism.world import make_world

    world = make_world("health")
    task = load_prompts("organism:task@seed=1")
    assert {r.response for r in task} == set(HOUSE_ANSWERS["school"]) <= set(world.domain("school").aligned)
    assert len(task) == 32 and {r.domain for r in task} == {"school"}
    v1 = load_prompts("organism:task-v1@seed=1")
    assert len(v1) == 64 and {r.response for r in v1} == set(TASK_ANSWERS)
    assert [r.messages for r in v1][::4] == [r.messages for r in task][::2]  # same prompts, other answers
    train = training_set(world, MixedConfig.for_world(world, 0))
    labels = [r.label for r in train]
    assert len(train) == 960 and labels.count("cruel") == 720
    heldout = {r.messages[-1][1] for r in task}
    assert not heldout & {r.prompt for r in train}  # the scored template is never trained on
    v1_train = training_set(world, MixedConfig.for_world(world, 0, "v1"))
    assert [r.label for r in v1_train].count("cruel") == 240
    with pytest.raises(MisfeatError, match="options go after '@'"):
        load_prompts("organism:task-v1:3")
    with pytest.raises(MisfeatError, match="organism:probe:<n>"):
        load_prompts("organism:probe:x")
