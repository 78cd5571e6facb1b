import pytest
import torch

from misfeat.data import PromptRecord, PromptSet, collate, encode, pad_id_of
from misfeat.errors import MisfeatError
from misfeat.generate import generate
from misfeat.hooks import position_masks
from misfeat.interventions import (
    Ablate,
    Add,
    ClampLatent,
    apply,
    load_intervention,
    read_intervention,
    save_intervention,
)

HOOK = "blocks.0.hook_resid_post"


def batch(model, with_response=True):
    ps = PromptSet("t", (PromptRecord("a", prompt="how do i fix my car", response="check brake"),
                         PromptRecord("b", prompt="fix roof", response="call doctor now")))
    enc = encode(ps, model, with_response=with_response)
    return collate(enc, pad_id_of(model))


def masks(b):
    return {"all": b.attention_mask, "prompt": b.prompt_mask, "response": b.response_mask, "last": b.last_mask}


def run(model, b, *interventions):
    with apply(model, *interventions), position_masks(masks(b)), torch.no_grad():
        return model(b.tokens)


def n_hooks(model):
    return sum(len(hp._forward_hooks) for hp in model.hook_dict.values())


def test_hooks_removed_after_exit_and_after_error(tiny_model):
    v = torch.randn(tiny_model.cfg.d_model)
    before = n_hooks(tiny_model)
    with apply(tiny_model, Add(HOOK, v, 1.0), Ablate("all", v)):
        assert n_hooks(tiny_model) > before
    assert n_hooks(tiny_model) == before
    with pytest.raises(RuntimeError, match="boom"), apply(tiny_model, Add(HOOK, v, 1.0)):
        raise RuntimeError("boom")
    assert n_hooks(tiny_model) == before
    # an error raised inside the forward (bad masks) also leaves no hook behind
    with pytest.raises(MisfeatError, match="positions='last' needs"), apply(tiny_model, Add(HOOK, v, 1.0, "last")):
        tiny_model(batch(tiny_model).tokens)
    assert n_hooks(tiny_model) == before


def test_add_zero_and_clamp_to_current_are_exact_noops(tiny_model):
    b = batch(tiny_model)
    clean = run(tiny_model, b)
    v = torch.randn(tiny_model.cfg.d_model)
    assert torch.equal(run(tiny_model, b, Add(HOOK, v, 0.0)), clean)
    sae = _tiny_sae(tiny_model)
    with torch.no_grad(), position_masks(masks(b)):
        _, cache = tiny_model.run_with_cache(b.tokens, names_filter=HOOK)
        z = sae.encode(cache[HOOK])
    # pick a latent that is constant wherever it is evaluated: clamp to its current value at one position
    latent = int(z[0, -1].argmax())
    value = float(z[0, -1, latent])
    only_here = {"all": b.attention_mask, "prompt": b.prompt_mask, "response": b.response_mask,
                 "last": torch.zeros_like(b.last_mask)}
    only_here["last"][0, -1] = True
    with apply(tiny_model, ClampLatent(sae, latent, value, "last")), position_masks(only_here), torch.no_grad():
        assert torch.equal(tiny_model(b.tokens), clean)


def test_add_only_touches_requested_positions(tiny_model):
    b = batch(tiny_model)
    v = torch.randn(tiny_model.cfg.d_model)
    captured = {}

    def grab(act, hook):
        captured[hook.name] = act.clone()

    for positions in ("all", "prompt", "response", "last"):
        with apply(tiny_model, Add(HOOK, v, 2.0, positions)), position_masks(masks(b)), torch.no_grad():
            tiny_model.run_with_hooks(b.tokens, fwd_hooks=[(HOOK, grab)])
        steered = captured[HOOK]
        with torch.no_grad():
            tiny_model.run_with_hooks(b.tokens, fwd_hooks=[(HOOK, grab)])
        diff = (steered - captured[HOOK]).norm(dim=-1) > 1e-6
        assert torch.equal(diff, b.positions(positions)), positions


def test_ablate_projects_out_and_sets_value(tiny_model):
    b = batch(tiny_model)
    d = torch.randn(tiny_model.cfg.d_model)
    unit = d / d.norm()
    got = {}

    def grab(act, hook):
        got["x"] = act.clone()

    for value in (None, 3.5):
        with apply(tiny_model, Ablate(HOOK, d, value)), torch.no_grad():
            tiny_model.run_with_hooks(b.tokens, fwd_hooks=[(HOOK, grab)])
        coord = got["x"] @ unit
        torch.testing.assert_close(coord, torch.full_like(coord, value or 0.0), atol=1e-5, rtol=0)
    with pytest.raises(MisfeatError, match="values for"):
        with apply(tiny_model, Ablate([HOOK, "blocks.1.hook_resid_post"], d, {HOOK: 1.0})), torch.no_grad():
            tiny_model(b.tokens)


def test_composition_and_several_layers(tiny_model):
    b = batch(tiny_model)
    v = torch.randn(tiny_model.cfg.d_model)
    both = run(tiny_model, b, Add(HOOK, v, 1.0), Add(HOOK, v, 2.0))
    once = run(tiny_model, b, Add(HOOK, v, 3.0))
    torch.testing.assert_close(both, once, atol=1e-5, rtol=0)
    multi = run(tiny_model, b, Add([HOOK, "blocks.1.hook_resid_post"], v, 1.0))
    assert not torch.allclose(multi, run(tiny_model, b, Add(HOOK, v, 1.0)))


def test_clamp_changes_only_that_latents_contribution(tiny_model):
    sae = _tiny_sae(tiny_model)
    b = batch(tiny_model)
    got = {}

    def grab(act, hook):
        got[len(got)] = act.clone()

    with torch.no_grad():
        tiny_model.run_with_hooks(b.tokens, fwd_hooks=[(HOOK, grab)])
        with apply(tiny_model, ClampLatent(sae, 3, 5.0)):
            tiny_model.run_with_hooks(b.tokens, fwd_hooks=[(HOOK, grab)])
        z = sae.encode(got[0])
    expected = got[0] + (5.0 - z[..., 3])[..., None] * sae.W_dec[3]
    torch.testing.assert_close(got[1], expected, atol=1e-5, rtol=1e-5)


def test_generation_with_response_intervention_equals_manual_loop(tiny_model):
    ps = PromptSet("t", (PromptRecord("a", prompt="how do i fix my car"), PromptRecord("b", prompt="fix roof")))
    v = torch.randn(tiny_model.cfg.d_model) * 3
    steer = Add(HOOK, v, 1.0, "response")
    with apply(tiny_model, steer):
        comps = generate(tiny_model, ps, max_new_tokens=6)
    for rec, comp in zip(ps, comps, strict=True):
        ids = list(encode([rec], tiny_model, with_response=False)[0].ids)
        n_prompt = len(ids)
        for _ in range(6):
            tokens = torch.tensor([ids])
            response = torch.zeros_like(tokens, dtype=torch.bool)
            response[0, n_prompt:] = True
            m = {"all": torch.ones_like(response), "response": response, "prompt": ~response,
                 "last": torch.zeros_like(response)}
            m["last"][0, n_prompt - 1] = True
            with apply(tiny_model, steer), position_masks(m), torch.no_grad():
                nxt = int(tiny_model(tokens)[0, -1].argmax())
            ids.append(nxt)
            if nxt == tiny_model.tokenizer.eos_token_id:
                break
        assert tuple(ids[n_prompt:]) == comp.ids


def test_generation_with_last_intervention_matches_scoring(tiny_model):
    """positions='last' during cached generation acts on the last prompt token only."""
    ps = PromptSet("t", (PromptRecord("a", prompt="fix my car"), PromptRecord("b", prompt="how do i save money")))
    v = torch.randn(tiny_model.cfg.d_model) * 5
    with apply(tiny_model, Add(HOOK, v, 1.0, "last")):
        comps = generate(tiny_model, ps, max_new_tokens=1)
        b = collate(encode(ps, tiny_model, with_response=False), pad_id_of(tiny_model), "left")
        with position_masks(masks(b)), torch.no_grad():
            logits = tiny_model(b.tokens, attention_mask=b.attention_mask.long())
    assert [c.ids[0] for c in comps] == logits[:, -1].argmax(-1).tolist()


def test_save_load_round_trip_and_wrong_site(tiny_model, tmp_path, gpt2_dir):
    v = torch.randn(tiny_model.cfg.d_model)
    path = save_intervention(Add(HOOK, v, 2.5, "last"), tmp_path / "dir", source={"kind": "direction", "name": "x"})
    record, vector = read_intervention(path)
    assert record["op"] == "add" and record["hooks"] == [HOOK] and record["layers"] == [0] and record["version"] == 2
    assert record["positions"] == "last" and record["scale"] == 2.5 and record["width"] == 32
    assert torch.equal(vector, v)
    again = load_intervention(path, tiny_model)
    assert isinstance(again, Add) and again.scale == 2.5
    assert isinstance(load_intervention(path, tiny_model, op="ablate"), Ablate)
    from misfeat.models import load_model

    gpt2 = load_model(gpt2_dir[0], device="cpu")  # d_model 64
    with pytest.raises(MisfeatError, match="another model"):
        load_intervention(path, gpt2)
    save_intervention(Add("blocks.1.hook_resid_post", v, 1.0), tmp_path / "deep")
    from tests.conftest import build_tiny_model

    shallow = build_tiny_model(tiny_model.tokenizer, n_layers=1)
    with pytest.raises(MisfeatError, match="unknown hook"):
        load_intervention(tmp_path / "deep.safetensors", shallow)


def test_bad_arguments(tiny_model):
    v = torch.randn(tiny_model.cfg.d_model)
    with pytest.raises(MisfeatError, match="unknown positions"):
        Add(HOOK, v, 1.0, "middle")
    with pytest.raises(MisfeatError, match="zero direction"):
        Ablate(HOOK, torch.zeros(32))
    with pytest.raises(MisfeatError, match="width"):
        with apply(tiny_model, Add(HOOK, torch.randn(7), 1.0)):
            pass
    with pytest.raises(MisfeatError, match="unknown hook"):
        with apply(tiny_model, Add("blocks.9.hook_resid_post", v, 1.0)):
            pass


def _tiny_sae(model):
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(0)
    sae = TopKSAE(TopKSAEConfig(d_in=model.cfg.d_model, d_sae=64, k=4, metadata=SAEMetadata(hook_name=HOOK)))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return sae.eval()


def test_masks_passed_to_apply_equal_declared_ones(tiny_model):
    b = batch(tiny_model)
    assert set(b.masks()) == set(masks(b)) and all(torch.equal(b.masks()[k], masks(b)[k]) for k in masks(b))
    v = torch.randn(tiny_model.cfg.d_model)
    expected = run(tiny_model, b, Add(HOOK, v, 2.0, "last"))
    with apply(tiny_model, Add(HOOK, v, 2.0, "last"), masks=b.masks()), torch.no_grad():
        got = tiny_model(b.tokens)
    assert torch.equal(got, expected)
    with pytest.raises(MisfeatError, match="masks=batch.masks()"), apply(tiny_model, Add(HOOK, v, 2.0, "last")):
        tiny_model(b.tokens)
    assert n_hooks(tiny_model) == 0


def _write_v1(path, record, vector):
    """A saved intervention exactly as misfeat wrote them before the version-2 record."""
    import json

    from safetensors.torch import save_file

    save_file({"vector": vector.contiguous()}, str(path), metadata={"misfeat": json.dumps(record)})
    return path


def test_version_1_files_still_load(tiny_model, tmp_path):
    from misfeat.sae import save_sae
    from tests.test_sae_latents import tiny_sae

    v = torch.randn(tiny_model.cfg.d_model)
    add = _write_v1(tmp_path / "add.safetensors", {"format": "misfeat-intervention", "version": 1, "op": "add",
                                                    "positions": "last", "hook": HOOK, "scale": 2.5, "width": 32,
                                                    "layers": [0], "source": {"kind": "vector"}}, v)
    got = load_intervention(add, tiny_model)
    assert isinstance(got, Add) and got.hook == HOOK and got.scale == 2.5 and got.positions == "last"
    assert read_intervention(add)[0]["hooks"] == [HOOK]
    values = {"blocks.0.hook_resid_pre": 0.5, "blocks.1.hook_resid_pre": -1.0, "blocks.1.hook_resid_post": 2.0}
    ablate = _write_v1(tmp_path / "ablate.safetensors", {"format": "misfeat-intervention", "version": 1,
                                                          "op": "ablate", "positions": "all", "hooks": "all",
                                                          "value": values, "width": 32, "layers": "all"}, v)
    got = load_intervention(ablate, tiny_model)
    assert isinstance(got, Ablate) and got.hooks == "all" and got.value == values
    save_sae(tiny_sae(), tmp_path / "sae")
    clamp = _write_v1(tmp_path / "clamp.safetensors", {"format": "misfeat-intervention", "version": 1, "op": "clamp",
                                                        "positions": "all", "hook": HOOK, "latent": 3, "value": 1.5,
                                                        "width": 32, "layers": [0],
                                                        "source": {"kind": "sae", "latent": 3,
                                                                   "path": str(tmp_path / "sae")}}, v)
    got = load_intervention(clamp, tiny_model)
    assert isinstance(got, ClampLatent) and got.latent == 3 and got.value == 1.5
    with pytest.raises(MisfeatError, match="newer than this misfeat"):
        read_intervention(_write_v1(tmp_path / "future.safetensors", {"format": "misfeat-intervention",
                                                                      "version": 9, "op": "add"}, v))


def test_version_2_records_name_each_strength(tiny_model, tmp_path):
    import json

    from misfeat.interventions import to_record

    v = torch.randn(tiny_model.cfg.d_model)
    assert to_record(Add(HOOK, v, 2.0))["scale"] == 2.0 and "coordinate" not in to_record(Add(HOOK, v, 2.0))
    rec = to_record(Ablate("all", v, {"blocks.0.hook_resid_pre": 1.0}))
    assert rec["hooks"] == ["all"] and rec["layers"] == "all" and rec["coordinate"] == {"blocks.0.hook_resid_pre": 1.0}
    path = save_intervention(Ablate([HOOK, "blocks.1.hook_resid_post"], v, 0.5, "last"), tmp_path / "two")
    on_disk = json.loads(path.with_suffix(".json").read_text())
    assert on_disk["hooks"] == [HOOK, "blocks.1.hook_resid_post"] and on_disk["layers"] == [0, 1]
    again = load_intervention(path, tiny_model)
    assert list(again.hooks) == [HOOK, "blocks.1.hook_resid_post"] and again.value == 0.5
