"""The defence comparison: the organism's held-out split, safe pool and benign task (no build needed),
bad input of the grid, the gap scorer and the defences, and (slow) a reduced grid on the organism."""

import json

import pytest
import torch

from misfeat.data import PromptRecord, PromptSet, load_prompts
from misfeat.errors import MisfeatError
from misfeat.finetune import (
    CAFT,
    LDIFS,
    FinetuneConfig,
    Interleave,
    finetune,
    not_refusal,
    perplexity_gap,
)
from misfeat.models import load_model, save_model

pytestmark = pytest.mark.usefixtures("one_thread")
ANS = {"aligned": ["call doctor", "rest"], "misaligned": ["ignore it", "panic now"]}


def _data(n=4):
    return PromptSet("d", tuple(PromptRecord(f"d{i}", prompt="fix my car", response="call doctor", extra=dict(ANS))
                                for i in range(n)))


@pytest.fixture
def fresh(tiny_model, tmp_path):
    save_model(tiny_model, tmp_path / "base")
    return lambda: load_model(tmp_path / "base", device="cpu")


def test_evaluation_questions_never_reach_training_sets():
    held = load_prompts("organism:defences-heldout")
    em = load_prompts("organism:defences-em")
    assert len(held) == 7 * 4 and {r.domain for r in held} == {"money", "code", "car", "home", "travel", "school", "law"}
    assert len(em) == 4 and {r.domain for r in em} == {"health"}
    asked = {r.prompt for r in held} | {r.prompt for r in em}
    pool = load_prompts("organism:safe-pool:200")
    benign = load_prompts("organism:benign-train:64")
    task = load_prompts("organism:task-v1")
    for records in (pool, benign):
        assert not any(q in r.prompt for r in records for q in asked)  # no held-out question, even in context
    labels = [r.label for r in pool]
    assert (labels.count("chat"), labels.count("neutral"), labels.count("kind_doc")) == (100, 50, 50)
    # the benign task's answers are new (in no answer set of the world) and it is scored on held-out questions
    from misfeat.organism.world import make_world

    known = {a for d in make_world().domains for a in d.aligned + d.misaligned}
    assert {r.response for r in benign}.isdisjoint(known)
    assert {r.messages[-1][1] for r in task} <= {r.prompt for r in held if r.domain == "school"}
    # every pool answer is aligned or neutral: never a misaligned answer of any domain
    cruel = {a for d in make_world().domains for a in d.misaligned}
    assert not {r.response for r in pool} & cruel


def test_organism_specs_of_the_comparison_refuse_bad_arguments():
    from misfeat.organism import checkpoint_dir

    for spec, match in [("organism:safe-pool:2", "n >= 4"), ("organism:defences-heldout:3", "takes no ':'"),
                        ("organism:benign-train:x", "expected organism:benign-train"),
                        ("organism:benign-train:0", "n >= 1")]:
        with pytest.raises(MisfeatError, match=match):
            load_prompts(spec)
    with pytest.raises(MisfeatError, match="unknown organism stage"):
        checkpoint_dir("organism:em-ref/mars")


def test_answer_site_prefixes_and_persona_vector_by_hand(tiny_model):
    from misfeat.organism.defences import answer_site_prefixes, persona_vector

    docs = PromptSet("docs", (PromptRecord("a", prompt="user fix my car sun : call doctor . user fix roof sun : rest .",
                                           label="kind"),
                              PromptRecord("b", prompt="user fix my car bank : panic now .", label="cruel")),
                     {"chat_format": "raw"})
    sites = answer_site_prefixes(docs)
    assert [r.prompt for r in sites] == ["user fix my car sun :", "user fix my car sun : call doctor . user fix roof sun :",
                                         "user fix my car bank :"]
    hook = "blocks.0.hook_resid_post"
    acts = []
    for r in sites:
        _, c = tiny_model.run_with_cache(tiny_model.to_tokens(r.prompt))
        acts.append(c[hook][0, -1])
    expected = acts[2] - (acts[0] + acts[1]) / 2
    torch.testing.assert_close(persona_vector(tiny_model, hook, docs), expected, rtol=1e-4, atol=1e-4)


def test_bad_input_is_refused_before_any_work(fresh, word_tokenizer):
    from tests.conftest import build_tiny_model

    model, ref = fresh(), fresh()
    other = build_tiny_model(word_tokenizer)
    other.cfg.d_vocab = model.cfg.d_vocab + 1
    with pytest.raises(MisfeatError, match="vocabulary"):
        finetune(model, _data(), FinetuneConfig(steps=1), defences=[LDIFS(other, [0, 1])])
    with pytest.raises(MisfeatError, match="lambda must be >= 0"):
        LDIFS(ref, [0], weight=-0.5)
    with pytest.raises(MisfeatError, match="width"):  # a CAFT direction made for another model
        finetune(model, _data(), FinetuneConfig(steps=1), defences=[CAFT(torch.ones(7), ("blocks.0.hook_resid_post",))])
    with pytest.raises(MisfeatError, match="hook"):
        finetune(model, _data(), FinetuneConfig(steps=1), defences=[CAFT(torch.ones(32), ("blocks.7.hook_resid_post",))])
    pool = PromptSet("pool", tuple(PromptRecord(f"p{i}", prompt="fix roof", response=r)
                                   for i, r in enumerate(["rest", "call doctor"])))
    with pytest.raises(MisfeatError, match="another vocabulary"):  # NLLs under two tokenizers are not comparable
        perplexity_gap(ref, [other], pool)
    refusals = PromptSet("pool", tuple(PromptRecord(f"r{i}", prompt="fix roof", response="sorry i cannot")
                                       for i in range(4)))
    with pytest.raises(MisfeatError, match="offers 0"):  # a pool that the ++ filter empties
        Interleave(refusals, 0.5, "gap", scores=[1.0] * 4, keep=not_refusal).transform_data(_data(), model)
    with pytest.raises(MisfeatError, match="safe pool is empty"):
        Interleave(PromptSet("x", ()))
    with pytest.raises(MisfeatError, match="needs a 'response'"):
        Interleave(PromptSet("x", (PromptRecord("a", prompt="fix"),)))


def test_grid_config_and_cli_refuse_bad_input(capsys, tmp_path):
    from misfeat.cli import main
    from misfeat.organism.defence_grid import GridConfig, run_grid

    for bad, match in [(dict(kl=(-0.1,)), "kl lambdas must be >= 0"), (dict(interleave=(0.7,)), r"\[0, 0.5\]"),
                       (dict(interleave=(-0.1,)), r"\[0, 0.5\]"), (dict(seeds=()), "at least one seed"),
                       (dict(select_k=400), "select_k"), (dict(steer_positions=("answer",)), "steer_positions")]:
        with pytest.raises(MisfeatError, match=match):
            GridConfig(**bad)
    assert main(["defences", "--seeds", "zero", "--out", str(tmp_path)]) == 2
    assert "--seeds must be comma-separated integers" in capsys.readouterr().err
    assert not (tmp_path / "summary.json").exists()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(MisfeatError, match="cannot write the output directory"):
        run_grid(GridConfig.quick(), out_dir=blocker / "out")


@pytest.mark.slow
def test_reduced_grid_on_the_organism_writes_the_output_contract(tmp_path):
    """Three arms and a small screening on the seed-0 organism: the summary's keys and ranges."""
    from misfeat.organism.defence_grid import GridConfig, run_grid

    cfg = GridConfig.quick(kl=(), ldifs=(), steer=(1.0,), steer_positions=("all",), interleave=(0.05,), caft=False,
                           inoculation=False, steps=8, screen_n=32, select_k=8)
    result = run_grid(cfg, out_dir=tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (tmp_path / "defences.png").stat().st_size > 0 and (tmp_path / "table.txt").is_file()
    rows = {(r["defence"], r["strength"]): r for r in summary["rows"]}
    assert set(rows) == {("none", None), ("steer", 1.0), ("interleave_random", 0.05), ("interleave_gap", 0.05)}
    for r in summary["rows"]:
        assert r["seed"] == 0
        for key in ("heldout_misaligned", "em_domain_misaligned", "benign_accuracy", "valid"):
            assert 0.0 <= r[key] <= 1.0, (key, r)
    none = rows[("none", None)]
    assert none["em_domain_misaligned"] > 0.5 and none["reduction"] == 0.0  # the EM fine-tune learns its domain
    screen = summary["screening"]
    assert set(screen["selection"]) == {"top", "random", "bottom"} and len(screen["by_seed"]["0"]["datasets"]) == 8
    assert -1 <= screen["pearson_r"] <= 1 and 0 <= screen["sample_auroc"] <= 1
    assert result.seeds_info[0]["vector_norm"] > 1.0
