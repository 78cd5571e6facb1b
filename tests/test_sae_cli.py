"""`misfeat train-sae` / `eval-sae` end to end, including data-parallel training under torchrun."""

from __future__ import annotations

import json
import os
import runpy
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from misfeat.cli import main  # noqa: E402

HOOK = "blocks.1.hook_resid_post"
WORDS = "user how do i fix my car the roof has a leak what should treat fever money bank loan code bug".split()


def _prompts(n=120, seed=0):
    from misfeat.data import PromptRecord, PromptSet

    gen = torch.Generator().manual_seed(seed)
    records = tuple(PromptRecord(f"p{i}", prompt=" ".join(WORDS[j] for j in torch.randint(len(WORDS), (10,),
                                                                                         generator=gen)))
                    for i in range(n))
    return PromptSet("cli", records, {"chat_format": "organism"})


@pytest.fixture(scope="module")
def tiny_dir(tiny_model, tmp_path_factory):
    from misfeat.models import save_model

    return save_model(tiny_model, tmp_path_factory.mktemp("model") / "m")


@pytest.fixture(scope="module")
def store_dir(tiny_model, tmp_path_factory):
    from misfeat.activations import cache_activations

    path = tmp_path_factory.mktemp("store") / "s"
    prompts_file = _prompts().to_jsonl(path.parent / "prompts.jsonl")
    cache_activations(tiny_model, str(prompts_file), [HOOK], path)
    return path


def _ev(sae, store_dir):
    from misfeat.activations import open_store

    store = open_store(store_dir)
    x = store.rows(HOOK, slice(0, store.n_rows))
    with torch.no_grad():
        return float(1 - (sae(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def test_train_sae_from_cache_writes_sae_and_summary(store_dir, tmp_path, capsys):
    from sae_lens import SAE

    out = tmp_path / "sae"
    assert main(["train-sae", "--cache", str(store_dir), "--d-sae", "64", "--k", "4", "--tokens", "8192",
                 "--batch-size", "256", "--out", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((out / "summary.json").read_text())
    assert printed == saved
    assert saved["hook"] == HOOK and saved["saes"][0]["steps"] == 32 and saved["saes"][0]["dir"] == str(out)
    assert (out / "cfg.json").exists() and (out / "sae_weights.safetensors").exists()
    sae = SAE.load_from_disk(str(out))
    assert sae.cfg.metadata.hook_name == HOOK and sae.cfg.k == 4
    assert _ev(sae, store_dir) > 0.6


def test_train_sae_sweep_and_eval_sae(store_dir, tiny_dir, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["train-sae", "--cache", str(store_dir), "--d-sae", "32,64", "--k", "2", "--tokens", "4096",
                 "--batch-size", "256", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "topk-d32-k2" in table and "topk-d64-k2" in table
    assert main(["eval-sae", "--sae", str(out / "topk-d64-k2"), "--cache", str(store_dir), "--model",
                 str(tiny_dir), "--tokens", "1000", "--json"]) == 0
    metrics = json.loads((out / "topk-d64-k2" / "metrics.json").read_text())
    assert metrics["n_tokens"] == 1000 and metrics["l0"] <= 2
    assert metrics["ce"]["n_prompts"] == 120 and metrics["ce"]["ce_zero"] != metrics["ce"]["ce_clean"]


def test_train_sae_from_live_model(tiny_dir, tmp_path):
    prompts = _prompts(40).to_jsonl(tmp_path / "p.jsonl")
    out = tmp_path / "live"
    assert main(["train-sae", "--model", str(tiny_dir), "--prompts", str(prompts), "--hook", HOOK, "--d-sae", "64",
                 "--k", "4", "--tokens", "4096", "--batch-size", "256", "--device", "cpu", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["model"] == str(tiny_dir) and summary["saes"][0]["tokens"] == 4096


def test_train_sae_bad_input_is_one_line(store_dir, tmp_path, capsys):
    assert main(["train-sae", "--d-sae", "8", "--out", str(tmp_path)]) == 2
    assert "give exactly one data source" in capsys.readouterr().err
    assert main(["train-sae", "--cache", str(store_dir), "--hook", "blocks.9.hook_resid_post", "--d-sae", "8",
                 "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no hook blocks.9.hook_resid_post" in err and "Traceback" not in err
    assert main(["train-sae", "--cache", str(store_dir), "--arch", "relu", "--k", "4", "--d-sae", "8",
                 "--out", str(tmp_path)]) == 2
    assert "no meaning for a relu" in capsys.readouterr().err


_EQUIVALENCE = textwrap.dedent("""
    import sys, torch
    from misfeat.sae import SAETrainConfig, train_sae
    from misfeat.sae.distributed import init_from_env, shutdown
    world, _ = init_from_env("cpu")
    gen = torch.Generator().manual_seed(0)
    basis = torch.randn(40, 16, generator=gen)
    data = [(torch.rand(64, 40, generator=gen) * (torch.rand(64, 40, generator=gen) < 0.1)) @ basis + 1
            for _ in range(12)]
    cfg = SAETrainConfig(hook_name="blocks.0.hook_resid_post", d_sae=32, k=4, total_tokens=64 * 12,
                         batch_size=64, init_tokens=128, lr=3e-3, dead_tokens=128, device="cpu")
    # each process reads its own half of every global batch
    sae = train_sae([b[world.rank::world.size] for b in data], cfg, show_progress=False)
    if world.rank == 0:
        torch.save(sae.state_dict(), sys.argv[1])
    shutdown()
""")


@pytest.mark.slow  # two torchrun launches (about 40 s); `make test` runs it
def test_torchrun_two_processes(store_dir, tmp_path):
    """2 CPU processes (gloo): the CLI trains a loadable SAE, and a data-parallel run equals
    a one-process run on the same global batches."""
    from sae_lens import SAE

    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MISFEAT_PROGRESS": "0"}
    out = tmp_path / "ddp"
    script = tmp_path / "equivalence.py"
    script.write_text(_EQUIVALENCE)
    cmd = (f"{torchrun} --standalone --nproc_per_node 2 -m misfeat train-sae --cache {store_dir} --d-sae 64 "
           f"--k 4 --tokens 8192 --batch-size 256 --device cpu --out {out} && "
           f"{torchrun} --standalone --nproc_per_node 2 {script} {tmp_path / 'ddp.pt'}")
    proc = subprocess.Popen(["bash", "-c", cmd], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["saes"][0]["steps"] == 32
    assert _ev(SAE.load_from_disk(str(out)), store_dir) > 0.6
    argv = sys.argv
    try:  # the same script in this process: a world of one on the whole batches
        sys.argv = [str(script), str(tmp_path / "single.pt")]
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = argv
    ddp, single = torch.load(tmp_path / "ddp.pt"), torch.load(tmp_path / "single.pt")
    for name, tensor in single.items():
        torch.testing.assert_close(ddp[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_train_sae_on_two_models_caches_fills_each_batch_half_and_half(tiny_model, store_dir, tmp_path):
    """--cache A,B (the model-diffing recipe): every batch's first half are rows of A, the second rows of B."""
    import copy

    from misfeat.activations import cache_activations, open_store
    from misfeat.errors import MisfeatError
    from misfeat.sae.sources import caches_source

    tuned = copy.deepcopy(tiny_model)
    with torch.no_grad():
        tuned.blocks[0].mlp.b_out += 3.0  # every row of its store differs from the base store's
    other = tmp_path / "tuned"
    cache_activations(tuned, str(store_dir.parent / "prompts.jsonl"), [HOOK], other)
    rows = [open_store(d).rows(HOOK, slice(0, open_store(d).n_rows)) for d in (store_dir, other)]

    def source_of(batch):  # 0 / 1: the store holding each row exactly
        return torch.stack([torch.cdist(batch, r).min(dim=1).values for r in rows]).argmin(dim=0)

    source = caches_source([store_dir, other], batch_size=64, tokens=640, seed=1)
    for _, batch in zip(range(5), source.batches, strict=False):
        assert batch.shape[0] == 64 and source_of(batch).tolist() == [0] * 32 + [1] * 32
    assert source.info["cache_rows"] == sum(r.shape[0] for r in rows)
    with pytest.raises(MisfeatError, match="not divisible"):
        caches_source([store_dir, other], batch_size=63, tokens=640)
    out = tmp_path / "sae"
    assert main(["train-sae", "--cache", f"{store_dir},{other}", "--d-sae", "32", "--k", "4", "--tokens", "2048",
                 "--batch-size", "128", "--out", str(out)]) == 0
    saved = json.loads((out / "summary.json").read_text())
    assert saved["data"]["caches"][1]["cache"] == str(other) and saved["saes"][0]["steps"] == 16
