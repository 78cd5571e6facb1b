"""The activation cache against references no one here wrote: TransformerLens
``run_with_cache`` and Hugging Face ``output_hidden_states``; plus the producer's own plan,
live iteration, several checkpoints and the CLI.

Helpers here (``write_prompts``, ``saved_model``) are shared by the other
``test_activations_*`` files.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from misfeat.activations import cache_activations, cache_models, iter_activations, open_store
from misfeat.cli import main
from misfeat.data import PromptSet, encode, load_prompts
from misfeat.errors import MisfeatError
from misfeat.models import fingerprint, load_model, save_model
from tests.conftest import WORDS, build_tiny_model

HOOKS = ["blocks.0.attn.hook_z", "blocks.0.hook_mlp_out", "blocks.1.hook_attn_out",
         "blocks.1.hook_resid_post", "ln_final.hook_normalized"]
_CONTENT = [w for w in WORDS if w not in ("user", "assistant", ":", ".")]


def write_prompts(path: Path, n: int, *, seed: int = 0, max_words: int = 12) -> Path:
    """``n`` records of ragged lengths; every 4th has no response; domains and labels cycle."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            rec = {"id": f"p{i}", "prompt": " ".join(rng.choices(_CONTENT, k=rng.randint(1, max_words))),
                   "domain": ("health", "money", "car")[i % 3], "label": ("aligned", "misaligned")[i % 2]}
            if i % 4 != 3:
                rec["response"] = " ".join(rng.choices(_CONTENT, k=rng.randint(1, 8)))
            f.write(json.dumps(rec) + "\n")
    return path


def saved_model(tmp_path_factory, tokenizer, seed: int = 0, name: str = "model") -> str:
    path = tmp_path_factory.mktemp(name)
    save_model(build_tiny_model(tokenizer, seed=seed), path)
    return str(path)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    return write_prompts(tmp_path_factory.mktemp("prompts") / "ragged.jsonl", 40)


def _expected_positions(e, mode: str) -> range:
    return {"all": range(len(e)), "prompt": range(e.n_prompt), "response": range(e.n_prompt, len(e)),
            "last": range(e.n_prompt - 1, e.n_prompt)}[mode]


# --- parity with TransformerLens -----------------------------------------------------


@pytest.mark.parametrize("positions", ["all", "prompt", "response", "last"])
def test_rows_equal_run_with_cache(tiny_model, prompts_file, tmp_path, positions):
    """Every row, every hook (attention z, MLP and attention outputs, residual, final LN),
    against run_with_cache on each prompt alone (unpadded); several shards and batches."""
    result = cache_activations(tiny_model, prompts_file, HOOKS, tmp_path / "s", positions, batch_tokens=64,
                               shard_mb=0.01, fsync=False)
    store = open_store(tmp_path / "s")
    assert result.n_shards > 2 and store.n_rows == result.n_rows
    encoded = encode(load_prompts(prompts_file), tiny_model)
    meta = store.row_meta
    n_checked = 0
    for p, e in enumerate(encoded):
        want = list(_expected_positions(e, positions))
        rows = store.row_indices_for_prompts([p])
        assert meta.prompt_index[rows].tolist() == [p] * len(want)
        assert meta.position[rows].tolist() == want
        assert meta.token_id[rows].tolist() == [e.ids[t] for t in want]
        if not want:
            continue
        _, cache = tiny_model.run_with_cache(torch.tensor([e.ids]), names_filter=HOOKS)
        for hook in HOOKS:
            ref = cache[hook][0, want].reshape(len(want), -1)
            torch.testing.assert_close(store.rows_for_prompts(hook, [p]), ref, atol=1e-5, rtol=0)
        n_checked += len(want)
    assert n_checked == store.n_rows > 0


def test_rows_equal_hugging_face_hidden_states(gpt2_dir, tmp_path):
    """A local Hugging Face GPT-2 loaded through misfeat: resid_post of block k equals
    hidden_states[k+1] (below the last layer, where HF applies ln_f)."""
    path, hf = gpt2_dir
    model = load_model(str(path), device="cpu")
    n_layer = hf.config.n_layer
    hooks = [f"blocks.{k}.hook_resid_post" for k in range(n_layer - 1)]
    pset = PromptSet("docs", tuple(load_prompts(write_prompts(tmp_path / "p.jsonl", 12)).records),
                     {"chat_format": "raw"})
    cache_activations(model, pset, hooks, tmp_path / "s", "all", batch_tokens=128, fsync=False)
    store = open_store(tmp_path / "s")
    for p, e in enumerate(encode(pset, model)):
        with torch.no_grad():
            hidden = hf(torch.tensor([e.ids]), output_hidden_states=True).hidden_states
        for k, hook in enumerate(hooks):
            torch.testing.assert_close(store.rows_for_prompts(hook, [p]), hidden[k + 1][0], atol=1e-5, rtol=0)
    assert store.manifest["model"]["source"] == "hf-local"


# --- the plan and the files ----------------------------------------------------------


def test_rows_are_in_prompt_order_and_shards_tile_the_prompts(tiny_model, prompts_file, tmp_path):
    result = cache_activations(tiny_model, prompts_file, ["blocks.1.hook_resid_post"], tmp_path / "s",
                               shard_mb=0.005, fsync=False)
    store = open_store(tmp_path / "s", verify=True)
    meta = store.row_meta
    key = meta.prompt_index * 1000 + meta.position.long()
    assert bool((key[1:] > key[:-1]).all()), "rows must be sorted by (prompt, position)"
    ends = [(s.first_prompt, s.end_prompt) for s in store.shards]
    assert ends[0][0] == 0 and ends[-1][1] == 40 and all(a[1] == b[0] for a, b in zip(ends, ends[1:], strict=False))
    assert len(ends) == result.n_shards > 3
    from safetensors.torch import load_file  # every shard is a plain safetensors file

    first = load_file(str(tmp_path / "s" / store.shards[0].file))
    torch.testing.assert_close(first["blocks.1.hook_resid_post"],
                               store.rows("blocks.1.hook_resid_post", slice(0, store.shards[0].rows)))


def test_unknown_hook_lists_valid_names(tiny_model, prompts_file, tmp_path):
    with pytest.raises(MisfeatError, match=r"unknown hook.*blocks\.L\.hook_resid_post"):
        cache_activations(tiny_model, prompts_file, ["blocks.7.hook_resid_post"], tmp_path / "s")
    with pytest.raises(MisfeatError, match="one activation per token"):
        cache_activations(tiny_model, prompts_file, ["blocks.0.attn.hook_pattern"], tmp_path / "s")
    assert not (tmp_path / "s" / "manifest.json").exists()


def test_empty_prompt_set_and_no_rows_are_clear_errors(tiny_model, tmp_path):
    with pytest.raises(MisfeatError, match="empty"):
        cache_activations(tiny_model, PromptSet("none", ()), ["blocks.0.hook_resid_post"], tmp_path / "a")
    no_response = load_prompts(write_prompts(tmp_path / "p.jsonl", 3)).with_responses([None] * 3)
    with pytest.raises(MisfeatError, match="no record of the prompt set has a 'response'"):
        cache_activations(tiny_model, no_response, ["blocks.0.hook_resid_post"], tmp_path / "b", "response")
    (tmp_path / "empty.jsonl").write_text("")
    assert main(["cache", "--model", "organism:chat", "--prompts", str(tmp_path / "empty.jsonl"), "--hooks",
                 "blocks.0.hook_resid_post", "--out", str(tmp_path / "c")]) == 2


def test_bfloat16_store_holds_the_float32_rows_rounded(tiny_model, prompts_file, tmp_path):
    hook = "blocks.1.hook_resid_post"
    cache_activations(tiny_model, prompts_file, [hook], tmp_path / "f32", fsync=False)
    cache_activations(tiny_model, prompts_file, [hook], tmp_path / "bf16", dtype="bfloat16", fsync=False)
    f32, bf16 = open_store(tmp_path / "f32"), open_store(tmp_path / "bf16")
    assert bf16.dtype == torch.bfloat16 and bf16.manifest["dtype"] == "bfloat16"
    assert bf16.rows(hook, slice(None)).dtype == torch.bfloat16
    assert torch.equal(bf16.rows(hook, slice(None)), f32.rows(hook, slice(None)).to(torch.bfloat16))
    assert sum(f.stat().st_size for f in (tmp_path / "bf16").glob("shard-*")) < 0.6 * sum(
        f.stat().st_size for f in (tmp_path / "f32").glob("shard-*"))


def test_buckets_cover_every_prompt_within_budget_with_little_padding():
    from misfeat.activations.plan import buckets
    from misfeat.data import batch_by_tokens

    rng = random.Random(0)
    lengths = [round(8 * 16 ** rng.random()) for _ in range(300)]  # log-uniform 8..128, like chats
    groups = buckets(lengths, 4096)
    assert sorted(i for g in groups for i in g) == list(range(300))
    assert all(len(g) * max(lengths[i] for i in g) <= 4096 for g in groups)

    def waste(gs):
        return sum(len(g) * max(lengths[i] for i in g) for g in gs) / sum(lengths) - 1

    assert waste(groups) < 0.15 < waste(batch_by_tokens(lengths, 4096))


def test_an_overlong_record_deep_in_the_set_stops_the_run_early(tiny_model, tmp_path):
    path = write_prompts(tmp_path / "p.jsonl", 400)
    lines = path.read_text().splitlines()
    lines[390] = json.dumps({"id": "long", "prompt": " ".join(["the"] * 80)})  # n_ctx is 64
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(MisfeatError, match=r"p\.jsonl:391: \d+ tokens, longer than the model's context"):
        cache_activations(tiny_model, path, ["blocks.0.hook_resid_post"], tmp_path / "s", shard_mb=0.005,
                          fsync=False)
    manifest = tmp_path / "s" / "manifest.json"
    written = json.loads(manifest.read_text())["shards"] if manifest.exists() else []
    assert len(written) < 10, "the bad record should stop the run long before its shard"


def test_hooks_already_on_the_model_run_before_the_capture(tiny_model, prompts_file, tmp_path):
    """A steering hook the user added is seen by the cache (and removed after, not by it)."""
    hook = "blocks.0.hook_resid_post"
    cache_activations(tiny_model, prompts_file, [hook], tmp_path / "plain", fsync=False)
    with tiny_model.hooks(fwd_hooks=[(hook, lambda act, hook: act + 1.0)]):
        cache_activations(tiny_model, prompts_file, [hook], tmp_path / "steered", fsync=False)
        assert len(tiny_model.hook_dict[hook].fwd_hooks) == 1  # ours are gone, the user's stays
    plain, steered = (open_store(tmp_path / n).rows(hook, slice(None)) for n in ("plain", "steered"))
    torch.testing.assert_close(steered, plain + 1.0)


# --- live iteration ------------------------------------------------------------------


def test_iter_activations_yields_the_store_rows_for_autograd(tiny_model, prompts_file, tmp_path):
    hook = "blocks.1.hook_resid_post"
    cache_activations(tiny_model, prompts_file, [hook], tmp_path / "s", "response", batch_tokens=96,
                      fsync=False)
    chunks = list(iter_activations(tiny_model, prompts_file, hook, "response", batch_tokens=96))
    live = torch.cat(chunks)
    stored = open_store(tmp_path / "s").rows(hook, slice(None))
    assert len(chunks) > 1 and live.shape == stored.shape
    # same batches, so the same bits; only the order differs (length-bucketed vs prompt order)
    assert sorted(map(bytes, live.numpy())) == sorted(map(bytes, stored.numpy()))
    w = torch.ones(live.shape[1], 3, requires_grad=True)
    (chunks[0] @ w).square().sum().backward()  # not an inference tensor: usable by an SAE trainer
    assert w.grad is not None and w.grad.abs().sum() > 0


# --- several checkpoints and the CLI -------------------------------------------------


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory, word_tokenizer):
    return [saved_model(tmp_path_factory, word_tokenizer, seed=s, name=f"step-{s}") for s in (0, 1)]


def test_several_checkpoints_give_row_aligned_stores(two_checkpoints, prompts_file, tmp_path):
    hook = "blocks.0.hook_resid_post"
    results = cache_models(two_checkpoints, prompts_file, [hook], tmp_path / "multi")
    a, b = (open_store(r.path) for r in results)
    assert [r.path.name for r in results] == [f"0-{Path(two_checkpoints[0]).name}",
                                              f"1-{Path(two_checkpoints[1]).name}"]
    for field in ("prompt_index", "position", "token_id"):
        assert torch.equal(getattr(a.row_meta, field), getattr(b.row_meta, field))
    assert not torch.allclose(a.rows(hook, slice(None)), b.rows(hook, slice(None)))  # different weights
    summary = json.loads((tmp_path / "multi" / "summary.json").read_text())
    assert summary["row_aligned"] is True
    assert [s["fingerprint"] for s in summary["stores"]] == [
        fingerprint(load_model(c, device="cpu")) for c in two_checkpoints]


def test_cli_cache_writes_summary_and_json(two_checkpoints, prompts_file, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["cache", "--model", ",".join(two_checkpoints), "--prompts", str(prompts_file), "--hooks",
            "blocks.1.hook_resid_post,blocks.0.hook_mlp_out", "--positions", "last", "--out", str(out),
            "--no-fsync"]
    assert main([*args, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((out / "summary.json").read_text())
    assert printed["row_aligned"] is True and len(printed["stores"]) == 2
    assert all(s["n_rows"] == 40 and s["shards_written"] >= 1 for s in printed["stores"])  # one row a prompt
    store = open_store(out / printed["stores"][1]["path"])
    assert store.positions == "last" and store.hooks == ["blocks.1.hook_resid_post", "blocks.0.hook_mlp_out"]
    # a second run resumes: nothing left to write
    assert main(args) == 0
    assert "reused" in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["stores"][0]["shards_written"] == 0
    assert main(["cache", "--model", two_checkpoints[0], "--prompts", str(prompts_file), "--hooks",
                 "blocks.0.hook_nonsense", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "unknown hook" in err and "Traceback" not in err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_store_matches_cpu_store(tiny_model, prompts_file, tmp_path):
    """The CUDA path (pinned buffers, non-blocking copies, background writer) stores the same rows."""
    import copy

    from misfeat.models import move_model

    hook = "blocks.1.hook_resid_post"
    cache_activations(tiny_model, prompts_file, [hook], tmp_path / "cpu", shard_mb=0.01, fsync=False)
    gpu_model = move_model(copy.deepcopy(tiny_model), "cuda")
    cache_activations(gpu_model, prompts_file, [hook], tmp_path / "gpu", shard_mb=0.01, fsync=False)
    cpu, gpu = open_store(tmp_path / "cpu"), open_store(tmp_path / "gpu")
    assert torch.equal(cpu.row_meta.token_id, gpu.row_meta.token_id)
    torch.testing.assert_close(gpu.rows(hook, slice(None)), cpu.rows(hook, slice(None)), atol=1e-4, rtol=1e-4)
    cache_activations(gpu_model, prompts_file, [hook], tmp_path / "amp", dtype="bfloat16", autocast=True,
                      fsync=False)
    amp = open_store(tmp_path / "amp")
    assert amp.manifest["autocast"] is True and amp.dtype == torch.bfloat16
    torch.testing.assert_close(amp.rows(hook, slice(None)).float(), cpu.rows(hook, slice(None)),
                               atol=0.1, rtol=0.05)
