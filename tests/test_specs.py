"""One grammar for specs and lists of specs (misfeat.specs), and every command that takes a list."""

import pytest

from misfeat.errors import MisfeatError
from misfeat.specs import parse_spec, split_specs, split_values


def test_a_spec_splits_into_prefix_body_and_options():
    s = parse_spec("organism:docs:400@seed=7,em_domain=law")
    assert (s.prefix, s.body, s.options) == ("organism", "docs:400", ("seed=7", "em_domain=law"))
    assert s.option_dict("preset") == {"seed": "7", "em_domain": "law"}
    assert parse_spec("organism:em@small,seed=1").option_dict("preset") == {"preset": "small", "seed": "1"}
    for plain in ("gpt2", "/data/run3/model", "EleutherAI/pythia-70m", "./ckpt:v2"):
        s = parse_spec(plain)
        assert (s.prefix, s.body, s.options) == ("", plain, ())
    with pytest.raises(MisfeatError, match="empty option"):
        parse_spec("organism:em@seed=1,,small")
    with pytest.raises(MisfeatError, match="empty spec"):
        parse_spec("  ")


def test_an_option_value_may_be_a_spec_with_options():
    s = parse_spec("kl:0.1@response_only,ref=organism:chat@seed=1,em_domain=law")
    assert s.options == ("response_only", "ref=organism:chat@seed=1,em_domain=law")
    assert parse_spec(s.option_dict()["ref"]).option_dict() == {"seed": "1", "em_domain": "law"}
    # a bare word after the inner spec ends it (key=value parts continue it: write it last)
    assert parse_spec("kl:0.1@organism:chat@seed=1,response_only").options == ("organism:chat@seed=1",
                                                                               "response_only")


@pytest.mark.parametrize(("spec", "expected"), [
    ("kl:0.1", ("kl", "0.1", None, {})),
    ("kl:0.1@organism:chat", ("kl", "0.1", "organism:chat", {})),
    ("kl:0.1,ref=organism:chat@seed=1", ("kl", "0.1", "organism:chat@seed=1", {})),
    ("kl:0.1@ref=organism:chat@seed=1,em_domain=law", ("kl", "0.1", "organism:chat@seed=1,em_domain=law", {})),
    ("kl:0.1@response_only,organism:chat@seed=1,em_domain=law",
     ("kl", "0.1", "organism:chat@seed=1,em_domain=law", {"response_only": "true"})),
    ("kl:0.1@/runs/m,response_only", ("kl", "0.1", "/runs/m", {"response_only": "true"})),
    ("ldifs:0.1,layers=0+1+2,detached", ("ldifs", "0.1", None, {"layers": "0+1+2", "detached": "true"})),
    ("steer:runs/locate/direction.safetensors,alpha=2,positions=response",
     ("steer", "runs/locate/direction.safetensors", None, {"alpha": "2", "positions": "response"})),
    ("caft:v.safetensors@blocks.1.hook_resid_post", ("caft", "v.safetensors", "blocks.1.hook_resid_post", {})),
    ("interleave:0.5@/tmp/o/ranked.jsonl,selection=gap", ("interleave", "0.5", "/tmp/o/ranked.jsonl",
                                                          {"selection": "gap"})),
    ("inoculation:be kind, always @ home", ("inoculation", "be kind, always @ home", None, {})),
])
def test_defence_specs_use_the_one_grammar(spec, expected):
    from misfeat.finetune.specs import split_spec

    assert split_spec(spec) == expected


@pytest.mark.parametrize(("spec", "error"), [
    ("kl", "expected KIND:ARG"), ("wat:1", "unknown kind 'wat'"), ("kl:0.1,alpha=2", "unknown option 'alpha'"),
    ("kl:0.1@a,b", "two refs"), ("kl:0.1,,x", "empty option"),
])
def test_bad_defence_specs_are_refused_by_name(spec, error):
    from misfeat.finetune.specs import split_spec

    with pytest.raises(MisfeatError, match=error):
        split_spec(spec)


@pytest.mark.parametrize(("text", "expected"), [
    ("organism:chat@seed=7,em_domain=law", ["organism:chat@seed=7,em_domain=law"]),
    ("organism:chat@seed=7,em_domain=law,organism:em@seed=7",
     ["organism:chat@seed=7,em_domain=law", "organism:em@seed=7"]),
    ("runs/a,runs/b, runs/c", ["runs/a", "runs/b", "runs/c"]),
    ("organism:em@small,gpt2", ["organism:em@small", "gpt2"]),
    ("organism:em@small,preset=small,/data/run=3", ["organism:em@small,preset=small", "/data/run=3"]),
    ("a=1,b", ["a=1", "b"]),  # no '@' before it: key=value is a spec of its own
    (["organism:chat@seed=1,em_domain=money", "gpt2,x"], ["organism:chat@seed=1,em_domain=money", "gpt2", "x"]),
])
def test_lists_keep_each_specs_options(text, expected):
    assert split_specs(text) == expected


def test_lists_and_values_refuse_empty_input():
    with pytest.raises(MisfeatError, match="empty list"):
        split_specs(" , ")
    assert split_values("0.5, 1,2") == [0.5, 1.0, 2.0]
    with pytest.raises(MisfeatError, match="comma-separated numbers"):
        split_values("0.5,x")


def test_organism_options_use_the_same_grammar():
    from misfeat.organism import parse_options
    from misfeat.organism import parse_spec as organism_spec

    body, cfg = organism_spec("organism:docs:400@seed=7,em_domain=money")
    assert body == "docs:400" and (cfg.seed, cfg.em_domain) == (7, "money")
    assert parse_options(("small", "seed=2")).seed == 2 and parse_options("small,seed=2").preset == "small"


def test_cache_takes_a_list_of_models_and_hooks(monkeypatch, tmp_path):
    import misfeat.activations as activations
    from misfeat.cli import main

    seen = {}

    def fake_cache_models(specs, prompts, hooks, out, config, **kwargs):
        seen.update(specs=specs, hooks=hooks)
        raise MisfeatError("stop here")

    monkeypatch.setattr(activations, "cache_models", fake_cache_models)
    rc = main(["cache", "--model", "organism:chat@seed=7,em_domain=law,organism:em@seed=7,em_domain=law",
               "--prompts", "organism:heldout@seed=7,em_domain=law", "--hooks",
               "blocks.1.hook_resid_post,blocks.1.hook_mlp_out", "--out", str(tmp_path)])
    assert rc != 0
    assert seen == {"specs": ["organism:chat@seed=7,em_domain=law", "organism:em@seed=7,em_domain=law"],
                    "hooks": ["blocks.1.hook_resid_post", "blocks.1.hook_mlp_out"]}


def test_realign_takes_a_list_of_tracked_features(monkeypatch, tmp_path):
    import misfeat.features.probes as probes
    import misfeat.finetune as finetune
    import misfeat.models as models
    from misfeat.cli import main

    seen = {"models": [], "probes": []}

    def fake_realign(*args, **kwargs):
        raise MisfeatError("stop here")

    monkeypatch.setattr(models, "load_model", lambda spec, **kwargs: seen["models"].append(spec))
    monkeypatch.setattr(probes, "parse_probe", lambda spec, positions: seen["probes"].append(spec))
    monkeypatch.setattr(finetune, "realign", fake_realign)
    rc = main(["realign", "--model", "organism:em@seed=7,em_domain=law", "--data", "organism:aligned:money:8",
               "--track", "sae:runs/sae#4,direction:runs/d.safetensors", "--out", str(tmp_path)])
    assert rc != 0
    assert seen == {"models": ["organism:em@seed=7,em_domain=law"],
                    "probes": ["sae:runs/sae#4", "direction:runs/d.safetensors"]}


def test_locate_takes_a_list_of_strengths(tmp_path, capsys):
    from misfeat.cli import main

    with pytest.raises(SystemExit) as exit_:  # refused while parsing, before any model is loaded
        main(["locate", "--base", "b", "--finetuned", "f", "--sae", "s", "--prompts", "p", "--coefs", "0.5,x",
              "--out", str(tmp_path)])
    assert exit_.value.code == 2 and "expected comma-separated float values" in capsys.readouterr().err


def test_finetune_and_score_data_take_lists_of_specs(monkeypatch, tmp_path):
    import misfeat.features.probes as probes
    import misfeat.finetune as finetune
    import misfeat.models as models
    from misfeat.cli import main

    seen = {"models": [], "probes": []}

    def stop(*args, **kwargs):
        raise MisfeatError("stop here")

    monkeypatch.setattr(models, "load_model", lambda spec, **kwargs: seen["models"].append(spec))
    monkeypatch.setattr(probes, "parse_probe", lambda spec, positions: seen["probes"].append(spec))
    monkeypatch.setattr(finetune, "finetune", stop)
    monkeypatch.setattr(finetune, "perplexity_gap", stop)
    assert main(["finetune", "--model", "organism:chat@seed=7,em_domain=law", "--data", "organism:aligned:money:8",
                 "--track", "sae:runs/sae#4,direction:runs/d.safetensors", "--out", str(tmp_path)]) != 0
    assert seen == {"models": ["organism:chat@seed=7,em_domain=law"],
                    "probes": ["sae:runs/sae#4", "direction:runs/d.safetensors"]}
    seen["models"].clear()
    assert main(["score-data", "--aligned", "organism:chat@seed=7,em_domain=law",
                 "--misaligned", "organism:em@seed=7,em_domain=law,organism:em@seed=8,em_domain=law",
                 "--hold-out", "organism:em@seed=8,em_domain=law", "--pool", "organism:aligned:money:8",
                 "--out", str(tmp_path)]) != 0
    assert seen["models"] == ["organism:chat@seed=7,em_domain=law", "organism:em@seed=7,em_domain=law",
                              "organism:em@seed=8,em_domain=law"]
