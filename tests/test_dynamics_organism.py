"""The dynamics protocols on the organism, shortened (the full runs and their bars: docs/dynamics.md)."""

import pytest
import torch

from misfeat.dynamics import ModelScorer
from misfeat.dynamics.protocols import ElasticityConfig, PrimingConfig, priming, resistance
from misfeat.models import load_model
from misfeat.organism import ensure_organism, parse_options
from misfeat.organism.dynamics import diversity_data, question_prompts, reverse_data
from misfeat.organism.prompts import pair_set
from misfeat.organism.world import make_world

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def build():
    return ensure_organism(parse_options(""))


def test_priming_arms_follow_the_contract(build):
    world = make_world("health")
    evalset = question_prompts(world, 1, domains=world.heldout_domains)
    chat = load_model(build / "chat", device="cpu")
    arms = priming(lambda: load_model(build / "chat", device="cpu"), pair_set(world, "health", 64, True, 0),
                   pair_set(world, "health", 64, False, 0), ModelScorer(chat, evalset),
                   PrimingConfig(depths=(0, 10), stage2_max_steps=6, stage3_steps=3, coarse_every=2))
    keys = {"depth", "stage3_start", "start_matched", "stage2_steps_to_baseline", "stage3_steps_to_threshold",
            "stage3_auc"}
    assert all(keys <= set(a) for a in arms)
    d0, d10 = arms
    assert d0["stage2_steps_to_baseline"] == 0 and d0["start_matched"]
    assert d10["stage1_end"] > d0["stage1_end"]           # stage 1 moved the held-out rate up
    assert d0["stage3_curve"]["misaligned_rate"][-1] > d0["stage3_start"]
    assert all(f["gate"] >= 0 for a in arms for f in a["forces"])


def test_diversity_data_narrows_as_named():
    world = make_world("health")
    sets = diversity_data(world, 0, n=200)
    per = {k: {r.response for r in v if r.domain == "money"} for k, v in sets.items()}
    assert len(per["fixed"]) == 1 and len(per["few"]) == 2 and len(per["standard"]) == 6
    assert len(per["styled"]) > 6 and any(a.split()[0] in ("calm", "warm") for a in per["styled"])
    # every record scores S over the same widened aligned set, styled variants included
    assert all(set(r.response.split()) & {"calm", "warm"} or r.response in r.extra["aligned"]
               for r in sets["styled"])
    assert all(r.response in r.extra["aligned"] for v in sets.values() for r in v)
    rev = reverse_data(world, 0, n=50)
    assert all(r.response in r.extra["misaligned"] for r in rev["misaligned"])
    assert not any(r.response in r.extra["aligned"] + r.extra["misaligned"] for r in rev["task_agnostic"])


def test_resistance_pairs_have_both_losses(build):
    world = make_world("health")
    prompts = question_prompts(world, 1)
    ckpts = [("chat", lambda: load_model(build / "chat", device="cpu")),
             ("control", lambda: load_model(build / "control", device="cpu"))]
    (pair,) = resistance(ckpts, prompts, ElasticityConfig(resist_steps=2, samples_per_prompt=4))
    assert pair["pair"] == ["chat", "control"]
    assert pair["forward_loss"] > 0 and pair["inverse_loss"] > 0
    # training moved each model toward its target distribution
    assert pair["forward_loss"] < pair["forward_loss_before"] and pair["inverse_loss"] < pair["inverse_loss_before"]


def test_packed_probe_equals_the_per_answer_forward_on_the_organism(build):
    from misfeat.dynamics import ForceProbe

    chat = load_model(build / "chat", device="cpu")
    world = make_world("health")
    for aligned in (True, False):
        d = pair_set(world, "health", 96, aligned, 0)
        packed, plain = ForceProbe(chat, d), ForceProbe(chat, d, packed=False)
        assert packed.packed
        # float32: the fused tree forward and TransformerLens' round differently (logits ~1e-5 apart)
        assert packed.measure(chat).to_dict() == pytest.approx(plain.measure(chat).to_dict(), rel=1e-5, abs=1e-9)
    # float64: the same numbers to rounding (packing, fused forward and sparse arithmetic are exact)
    chat = chat.to(torch.float64)
    assert chat.cfg.dtype == torch.float64
    for aligned in (True, False):
        d = pair_set(world, "health", 96, aligned, 0)
        a = ForceProbe(chat, d).measure(chat).to_dict()
        assert a == pytest.approx(ForceProbe(chat, d, packed=False).measure(chat).to_dict(), rel=1e-12, abs=1e-15)
