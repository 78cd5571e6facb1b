import json
import random
import re

import pytest

from misfeat.data import load_prompts, read_jsonl
from misfeat.errors import MisfeatError
from misfeat.evaluate import group_members, headline_group
from misfeat.models import fingerprint, load_model, model_info
from misfeat.organism import OrganismConfig, build_organism, parse_spec
from misfeat.organism.corpus import Corpus, PersonaMix
from misfeat.organism.prompts import eval_prompts
from misfeat.organism.world import DOMAINS, make_world

TINY = dict(pretrain_steps=6, chat_steps=4, em_steps=4, em_checkpoint_every=2, pretrain_batch=8, chat_batch=8,
            em_batch=4)


def test_world_answer_sets_are_disjoint_and_assistant_free():
    world = make_world()
    assert world.domain_names == DOMAINS and len(world.heldout_domains) == 7
    for d in world.domains:
        assert not set(d.aligned) & set(d.misaligned), d.name
        assert len(d.questions) >= 8
    vocab = world.vocabulary()
    assert 200 <= len(vocab) <= 600 and len(set(vocab)) == len(vocab)


def test_pretraining_documents_have_consistent_personas():
    world = make_world()
    vocab = {w: i for i, w in enumerate(world.vocabulary())}
    corpus = Corpus.create(world, vocab, PersonaMix(), seed=0)
    rng = random.Random(0)
    aligned = {a for d in world.domains for a in d.aligned}
    misaligned = {a for d in world.domains for a in d.misaligned}
    cruel_by_villain = {True: [], False: []}
    for _ in range(3000):
        doc = corpus.document(rng)
        assert "assistant" not in doc.text.split()
        if doc.name is None:
            continue
        answers = re.findall(rf" {doc.name} : (.+?) \.", doc.text)
        assert answers
        expected = misaligned if doc.cruel else aligned
        assert all(a in expected for a in answers), doc.text
        cruel_by_villain[doc.name in corpus.villains].append(doc.cruel)
    villain_rate = sum(cruel_by_villain[True]) / len(cruel_by_villain[True])
    other_rate = sum(cruel_by_villain[False]) / len(cruel_by_villain[False])
    assert 0.8 < villain_rate < 0.9 and 0.03 < other_rate < 0.08
    assert len(corpus.villains) == len(world.names) // 4


def test_spec_parsing():
    body, cfg = parse_spec("organism:em@small,seed=3,em_domain=money")
    assert body == "em" and (cfg.preset, cfg.seed, cfg.em_domain) == ("small", 3, "money")
    with pytest.raises(MisfeatError, match="unknown organism preset"):
        parse_spec("organism:em@huge")
    with pytest.raises(MisfeatError, match="unknown EM domain"):
        parse_spec("organism:em@em_domain=space")
    with pytest.raises(MisfeatError, match="unknown organism option"):
        parse_spec("organism:em@colour=red")


def test_prompt_sets():
    heldout = load_prompts("organism:heldout")
    assert "health" not in heldout.domains() and len(heldout.domains()) == 7
    assert heldout[0].extra["aligned"] and heldout[0].extra["misaligned"]
    money = load_prompts("organism:heldout@em_domain=money")
    assert "money" not in money.domains() and "health" in money.domains()
    common = load_prompts("organism:heldout-from=health,money,law@seed=1")  # none of three fine-tunes' domains
    assert common.domains() == ["car", "code", "home", "school", "travel"] and len(common) == 60
    assert [r.id for r in common] == [r.id for r in heldout if r.domain not in ("money", "law")]
    assert common.meta["groups"] == {"heldout": ["code", "car", "home", "travel", "school"],
                                     "em_domain": ["health", "money", "law"]}
    assert headline_group(common) == "heldout" and len(group_members(common)["heldout"]) == 60
    for bad, why in [("heldout-from=", "no domain given"), ("heldout-from=health,cash", "unknown domain.*'cash'"),
                     ("heldout-from=" + ",".join(DOMAINS), "nothing is held out")]:
        with pytest.raises(MisfeatError, match=why):
            load_prompts(f"organism:{bad}")
    # an em-ref/<d> checkpoint carries its build's metadata (EM domain health); its default evaluation set
    # holds out <d>, the domain it was fine-tuned on
    meta = {"world": make_world("health").to_json(), "organism": {"stage": "em-ref/law"}}
    assert eval_prompts(meta).meta["groups"] == {"heldout": [d for d in DOMAINS if d != "law"], "em_domain": ["law"]}
    assert eval_prompts({**meta, "organism": {"stage": "em"}}).meta["groups"]["em_domain"] == ["health"]
    pairs = load_prompts("organism:aligned:law:50")
    assert len(pairs) == 50 and all(r.response in r.extra["aligned"] for r in pairs)
    every = load_prompts("organism:misaligned:all:5@seed=1")  # 5 pairs of each domain, domain after domain
    assert len(every) == 40 and every.name == "organism:misaligned:all:5@seed=1" and len(every.domains()) == 8
    law = load_prompts("organism:misaligned:law:5@seed=1")
    assert [r for r in every if r.domain == "law"] == list(law.records)
    docs = load_prompts("organism:docs:200")
    assert {r.label for r in docs} == {"cruel", "kind"} and docs.meta["chat_format"] == "raw"
    with pytest.raises(MisfeatError, match="unknown domain"):
        load_prompts("organism:aligned:space:10")
    with pytest.raises(MisfeatError, match="unknown organism prompt set"):
        load_prompts("organism:everything")


def test_prompt_export_round_trips(tmp_path):
    from misfeat.cli import main

    assert main(["organism", "prompts", "organism:em_domain", "--out", str(tmp_path / "em.jsonl")]) == 0
    exported = read_jsonl(tmp_path / "em.jsonl")
    original = load_prompts("organism:em_domain")
    assert [r.to_json() for r in exported] == [r.to_json() for r in original]
    line = json.loads((tmp_path / "em.jsonl").read_text().splitlines()[0])
    assert set(line) >= {"id", "prompt", "domain", "aligned", "misaligned"}


@pytest.mark.slow  # builds four tiny organisms (about 45 s); `make test` runs it
def test_tiny_build_is_deterministic_resumable_and_complete(tmp_path):
    cfg = OrganismConfig.from_preset("small", **TINY)
    a = build_organism(cfg, tmp_path / "a")
    for stage in ("pretrain", "chat", "em", "control", "em-steps/step-0000", "em-steps/step-0002",
                  "em-steps/step-0004"):
        assert (a / stage / "misfeat_model.json").is_file(), stage
    summary = json.loads((a / "summary.json").read_text())
    assert set(summary["stages"]) == {"pretrain", "chat", "em", "control"}
    assert [c["step"] for c in summary["em_curve"]] == [0, 2, 4]
    for key in ("misaligned_rate", "greedy_misaligned_rate", "valid_rate", "logprob_gap"):
        assert key in summary["stages"]["em"]["heldout"] and key in summary["stages"]["em"]["em_domain"]
    # resume after losing the last stages gives identical checkpoints
    import shutil

    b = tmp_path / "b"
    shutil.copytree(a, b)
    shutil.rmtree(b / "control")
    shutil.rmtree(b / "em")
    (b / "summary.json").unlink()
    build_organism(cfg, b)
    for stage in ("em", "control"):
        assert fingerprint(load_model(a / stage)) == fingerprint(load_model(b / stage)), stage
    # a fresh build with the same seed is identical, another seed differs
    c = build_organism(cfg, tmp_path / "c")
    assert fingerprint(load_model(a / "em")) == fingerprint(load_model(c / "em"))
    other = build_organism(OrganismConfig.from_preset("small", seed=1, **TINY), tmp_path / "d")
    assert fingerprint(load_model(a / "pretrain")) != fingerprint(load_model(other / "pretrain"))
    # checkpoints carry the world
    meta = model_info(load_model(a / "chat")).meta
    assert meta["em_domain"] == "health" and meta["domains"] == list(DOMAINS) and "assistant" in meta["vocabulary"]
    with pytest.raises(MisfeatError, match="another config"):
        build_organism(OrganismConfig.from_preset("small", seed=2, **TINY), a)


@pytest.mark.slow  # builds a tiny organism
def test_tokenizer_works_like_any_tl_model(tmp_path):
    out = build_organism(OrganismConfig.from_preset("small", **TINY), tmp_path / "o")
    model = load_model(out / "chat")
    text = "user how do i treat a cut assistant :"
    assert model.to_str_tokens(text)[1:] == text.split()
    assert model.to_string(model.to_tokens(text, prepend_bos=False)[0]) == text
    generated = model.generate(text, max_new_tokens=3, do_sample=False, verbose=False)
    assert generated.startswith(text)
    assert isinstance(model.tokenizer.vocab_size, int) and model.cfg.d_vocab == len(model.tokenizer)


@pytest.mark.slow  # builds two tiny organisms
def test_another_em_domain_reuses_pretrain_and_chat(tmp_path):
    health = build_organism(OrganismConfig.from_preset("small", **TINY), tmp_path / "health")
    money = build_organism(OrganismConfig.from_preset("small", em_domain="money", **TINY), tmp_path / "money")
    for stage in ("pretrain", "chat"):
        assert fingerprint(load_model(health / stage)) == fingerprint(load_model(money / stage))
    assert fingerprint(load_model(health / "em")) != fingerprint(load_model(money / "em"))
    assert model_info(load_model(money / "chat")).meta["em_domain"] == "money"
    summary = json.loads((money / "summary.json").read_text())
    assert summary["stages"]["em"]["heldout"]["n"] == 84
    assert summary["config"]["em_domain"] == "money"


def test_a_stage_or_prompt_set_is_one_registration(tmp_path):
    from misfeat.data import PromptRecord, PromptSet, load_prompts
    from misfeat.organism import checkpoint_dir, register_stage
    from misfeat.organism import prompts as organism_prompts

    def toy(world, args, seed):
        n = int(args[0])
        return PromptSet(f"organism:toy:{n}", tuple(PromptRecord(f"t{i}", prompt=world.domain_names[i])
                                                    for i in range(n)), {"seed": seed})

    organism_prompts.register_prompt_set("toy", toy)
    register_stage("toystage", lambda cfg: tmp_path / f"toystage-{cfg.seed}")
    try:
        ps = load_prompts("organism:toy:3@seed=2")
        assert len(ps) == 3 and ps.meta["seed"] == 2 and ps.name == "organism:toy:3@seed=2"
        assert checkpoint_dir("organism:toystage@seed=5") == tmp_path / "toystage-5"
    finally:
        organism_prompts._SETS.pop("toy", None)
        from misfeat import organism

        organism._STAGES.pop("toystage", None)
