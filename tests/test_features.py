import json

import pytest
import torch

from misfeat.activations import cache_activations, open_store
from misfeat.data import PromptRecord, PromptSet
from misfeat.errors import MisfeatError
from misfeat.features.attribution import gap_gradients
from misfeat.features.diff import diff_latents
from misfeat.features.directions import (
    Direction,
    contrastive_direction,
    decoder_cosines,
    load_direction,
    mean_diff,
    random_like,
    save_direction,
)
from misfeat.features.examples import auroc, top_examples
from misfeat.features.trajectory import Trajectory
from misfeat.models import save_model

HOOK = "blocks.0.hook_resid_post"
ANS = {"aligned": ["call doctor", "rest"], "misaligned": ["ignore it", "panic now"]}


def prompts():
    qs = [("fix my car", "car"), ("how do i fix my roof", "home"), ("fever", "health"), ("save my money", "money")]
    return PromptSet("p", tuple(PromptRecord(f"q{i}", prompt=q, domain=d, label="cruel" if i % 2 else "kind",
                                             extra=dict(ANS)) for i, (q, d) in enumerate(qs)),
                     {"groups": {"heldout": ["car", "home", "money"], "em_domain": ["health"]}, "headline": "heldout",
                      "contrast": ["cruel", "kind"]})


def tiny_sae(d_in, d_sae=48, k=4, seed=0):
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(seed)
    sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k, metadata=SAEMetadata(hook_name=HOOK)))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return sae.eval()


@pytest.fixture(scope="module")
def pair(word_tokenizer):
    from tests.conftest import build_tiny_model

    return build_tiny_model(word_tokenizer, seed=0), build_tiny_model(word_tokenizer, seed=1)


@pytest.fixture(scope="module")
def stores(pair, tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    for name, model in zip(("a", "b"), pair, strict=True):
        cache_activations(model, prompts(), [HOOK], root / name, positions="all")
    return open_store(root / "a", prompts=prompts()), open_store(root / "b", prompts=prompts())


def test_diff_latents_matches_a_direct_computation(pair, stores):
    sae = tiny_sae(32)
    a, b = stores
    diff = diff_latents(sae, a, b, by="domain")
    with torch.no_grad():
        za, zb = sae.encode(a.rows(HOOK, slice(None))), sae.encode(b.rows(HOOK, slice(None)))
    torch.testing.assert_close(diff.base.mean, za.mean(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(diff.increase, zb.mean(0) - za.mean(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(diff.finetuned.firing, (zb > 0).float().mean(0))
    top = diff.top(3)
    assert top[0]["increase"] == pytest.approx(float((zb.mean(0) - za.mean(0)).max()), rel=1e-5)
    drops = diff.top(3, decreasing=True)
    assert drops[0]["increase"] == pytest.approx(float((zb.mean(0) - za.mean(0)).min()), rel=1e-5)
    # per domain: the car rows only
    car = torch.tensor([a.prompts[int(i)].domain == "car" for i in a.row_meta.prompt_index])
    assert top[0]["increase[car]"] == pytest.approx(float((zb[car].mean(0) - za[car].mean(0))[top[0]["latent"]]),
                                                    rel=1e-4, abs=1e-6)


def test_diff_refuses_unaligned_stores(pair, stores, tmp_path):
    other = PromptSet("o", (PromptRecord("x", prompt="fix my roof now"),))
    cache_activations(pair[1], other, [HOOK], tmp_path / "o", positions="all")
    with pytest.raises(MisfeatError, match="not row-aligned"):
        diff_latents(tiny_sae(32), stores[0], open_store(tmp_path / "o"))


def test_gap_gradients_match_finite_differences(pair):
    model, sae = pair[0], tiny_sae(32)
    ps = PromptSet("p", prompts().records[:2])
    grads = gap_gradients(model, sae, ps, "last")
    from misfeat.evaluate import answer_set_logprobs
    from misfeat.hooks import position_masks  # noqa: F401  (positions are declared by the evaluation)
    from misfeat.interventions import Add, apply

    def gap(eps, latent):
        with apply(model, Add(HOOK, sae.W_dec[latent].detach(), eps, "last")):
            al, mis = answer_set_logprobs(model, list(ps))
        return float((mis - al).mean())

    for latent in torch.argsort(grads.abs(), descending=True)[:3].tolist():
        eps = 1e-2
        numeric = (gap(eps, latent) - gap(-eps, latent)) / (2 * eps)
        assert grads[latent].item() == pytest.approx(numeric, rel=2e-2, abs=1e-4)


def test_directions(pair, stores, tmp_path):
    a, b = stores
    d = mean_diff(b, a, HOOK)
    torch.testing.assert_close(d.vector, b.rows(HOOK, slice(None)).mean(0) - a.rows(HOOK, slice(None)).mean(0),
                               atol=1e-5, rtol=1e-5)
    ps = prompts()
    c = contrastive_direction(pair[0], ps.filter(label="cruel"), ps.filter(label="kind"), HOOK, "all")
    assert c.vector.shape == (32,) and c.source["method"] == "contrastive"
    r = random_like(c, seed=3)
    assert r.norm == pytest.approx(c.norm, rel=1e-5) and abs(r.cosine(c)) < 0.9
    path = save_direction(c, tmp_path / "persona")
    again = load_direction(path)
    assert again.hook == HOOK and torch.equal(again.vector, c.vector)
    sae = tiny_sae(32)
    top = decoder_cosines(Direction(HOOK, sae.W_dec[7].detach().clone()), sae, top=3)
    assert top[0]["latent"] == 7 and top[0]["cosine"] == pytest.approx(1.0, abs=1e-5)


def test_auroc_golden():
    assert auroc([3, 4, 5], [0, 1, 2]) == 1.0
    assert auroc([0, 1], [2, 3]) == 0.0
    assert auroc([1, 2], [1, 0]) == pytest.approx(0.875)  # 3 wins and one tie (1 vs 1) of 4 pairs


def test_trajectory_onset():
    rows = [{"step": s, "misaligned_rate": m, "latent": f} for s, m, f in
            [(0, 0.0, 0.0), (2, 0.05, 2.0), (4, 0.2, 3.5), (6, 0.6, 4.0), (8, 0.7, 4.0)]]
    t = Trajectory(rows, ["latent"])
    assert t.onset("latent") == 2 and t.onset("misaligned_rate") == 6
    assert t.summary()["feature_leads_by_steps"] == {"latent": 4}


def test_top_examples_render(pair):
    sae = tiny_sae(32)
    ex = top_examples(pair[0], sae, 5, prompts(), k=2)
    assert len(ex.examples) == 2 and ex.examples[0].max_act >= ex.examples[1].max_act
    assert ex.examples[0].tokens[0] == "<bos>" and len(ex.examples[0].acts) == len(ex.examples[0].tokens)
    html = ex._repr_html_()
    assert "<span" in html and "latent 5" in html
    assert "latent 5" in str(ex)


def test_locate_cli_end_to_end(pair, tmp_path, capsys):
    from misfeat.cli import main
    from misfeat.sae.io import save_sae

    for name, model in zip(("base", "ft"), pair, strict=True):
        save_model(model, tmp_path / name)
    save_sae(tiny_sae(32), tmp_path / "sae")
    path = prompts().to_jsonl(tmp_path / "p.jsonl")
    assert main(["locate", "--base", str(tmp_path / "base"), "--finetuned", str(tmp_path / "ft"), "--sae",
                 str(tmp_path / "sae"), "--prompts", str(path), "--screen", "3", "--coefs", "0.5",
                 "--examples-prompts", str(path), "--out", str(tmp_path / "out")]) == 0
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    row = s["top_latents"][0]
    assert {"latent", "increase", "base_mean", "finetuned_mean", "steer_up_misaligned", "steer_up_valid",
            "steer_down_misaligned", "steer_down_valid"} <= set(row)
    assert isinstance(s["feature"], int) and s["direction"].endswith(".safetensors")
    assert load_direction(s["direction"]).hook == HOOK
    for name in ("ranking.png", "screen.png", "examples.jsonl", "examples.txt"):
        assert (tmp_path / "out" / name).is_file(), name
    out = capsys.readouterr().out
    assert "feature: latent" in out
    single = s["single"]  # the human line carries the figure and its interval from summary.json
    lo, hi = single["steer_up_ci95"]
    assert (f"latent {s['feature']}: steered up in the base model misaligned {single['steer_up_misaligned']:.3f} "
            f"[{lo:.2f}, {hi:.2f}]") in out and "baseline random: steered up" in out
    assert f"cut {100 * single['clamp_cut']:.0f}%" in out and "along its direction (every layer, answer position only):" in out
    assert s["config"]["clamp_positions"] == "last" and "'last' positions only" in s["clamp"]["method"]
    assert main(["locate", "--base", str(tmp_path / "base"), "--finetuned", str(tmp_path / "ft"), "--sae",
                 str(tmp_path / "sae"), "--prompts", str(path), "--screen", "1", "--coefs", "0.5", "--group-cap", "1",
                 "--examples-prompts", str(path), "--clamp-positions", "all", "--out", str(tmp_path / "all")]) == 0
    s = json.loads((tmp_path / "all" / "summary.json").read_text())
    assert s["config"]["clamp_positions"] == "all" and "at every token" in s["clamp"]["method"]
    assert "along its direction (every layer):" in capsys.readouterr().out


def test_trajectory_measures_every_checkpoint_in_step_order(pair, tmp_path):
    from misfeat.checkpoints import list_checkpoints
    from misfeat.evaluate import evaluate
    from misfeat.features.probes import DirectionProbe
    from misfeat.features.trajectory import trajectory

    for step, model in ((10, pair[1]), (2, pair[0])):
        save_model(model, tmp_path / "run" / f"step-{step:04d}")
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-0002", "step-0010"]
    v = torch.ones(32)
    traj = trajectory(tmp_path / "run", [DirectionProbe(HOOK, v, "last", name="ones")], prompts())
    assert [r["step"] for r in traj.rows] == [2, 10] and traj.probes == ["ones"]
    for row, model in zip(traj.rows, pair, strict=True):
        assert row["misaligned_rate"] == pytest.approx(evaluate(model, prompts(), greedy=False).headline.misaligned_rate)
    with pytest.raises(MisfeatError, match="no misfeat checkpoints"):
        trajectory(tmp_path / "empty", [], prompts())
