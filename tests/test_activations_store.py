"""The store cannot be corrupted: SIGKILL + resume is byte-identical, a mismatched resume is
refused, damaged shards are caught, a full disk loses nothing, torchrun composes."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from misfeat.activations import DiskFullError, StoreError, cache_activations, open_store
from misfeat.activations import shards as shards_module
from misfeat.cli import main
from misfeat.models import load_model
from tests.conftest import build_tiny_model
from tests.test_activations import saved_model, write_prompts

HOOK = "blocks.1.hook_resid_post"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, word_tokenizer):
    return saved_model(tmp_path_factory, word_tokenizer)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    return write_prompts(tmp_path_factory.mktemp("p") / "p.jsonl", 60)


def store_files(path: Path) -> dict[str, bytes]:
    """Every file of a store (the CLI's summary.json is a report beside it, not part of it)."""
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.name != "summary.json"}


def _cache(model, prompts, out, **kw):
    kw.setdefault("shard_mb", 0.005)
    kw.setdefault("fsync", False)
    return cache_activations(model, prompts, kw.pop("hooks", [HOOK]), out, kw.pop("positions", "all"), **kw)


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MISFEAT_PROGRESS": "0",
            "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


# --- interruption --------------------------------------------------------------------


def test_sigkill_mid_run_then_resume_is_byte_identical(model_dir, tmp_path):
    prompts = write_prompts(tmp_path / "many.jsonl", 400)
    args = ["cache", "--model", model_dir, "--prompts", str(prompts), "--hooks", HOOK,
            "--out", str(tmp_path / "killed"), "--shard-mb", "0.02", "--no-fsync"]
    proc = subprocess.Popen([sys.executable, "-m", "misfeat", *args], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    manifest = tmp_path / "killed" / "manifest.json"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if manifest.exists() and len(json.loads(manifest.read_text())["shards"]) >= 2:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.005)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, f"not killed mid-run: {proc.stderr.read().decode()[-2000:]}"
    partial = json.loads(manifest.read_text())
    assert partial["complete"] is False and 2 <= len(partial["shards"]) < partial["n_shards"]
    with pytest.raises(StoreError, match="incomplete"):
        open_store(tmp_path / "killed")

    torch.set_num_threads(1)
    assert main([*args, "--json"]) == 0  # the same command resumes
    assert main(["cache", *args[1:-5], "--out", str(tmp_path / "clean"), "--shard-mb", "0.02",
                 "--no-fsync"]) == 0
    resumed = json.loads((tmp_path / "killed" / "summary.json").read_text())["stores"][0]
    assert resumed["shards_reused"] >= 2 and resumed["shards_written"] > 0
    killed, clean = store_files(tmp_path / "killed"), store_files(tmp_path / "clean")
    assert list(killed) == list(clean) and len(clean) == partial["n_shards"] + 1
    assert killed == clean, [name for name in clean if killed[name] != clean[name]]
    assert open_store(tmp_path / "killed").n_rows == json.loads(killed["manifest.json"])["n_rows"] > 0


def test_resume_with_different_settings_is_refused_naming_each_difference(tiny_model, word_tokenizer,
                                                                           prompts_file, tmp_path):
    out = tmp_path / "s"
    _cache(tiny_model, prompts_file, out)
    before = store_files(out)
    other_model = build_tiny_model(word_tokenizer, seed=3)
    fewer = write_prompts(tmp_path / "fewer.jsonl", 30)
    cases = [
        (dict(model=other_model), ["model (fingerprint)"]),
        (dict(prompts=fewer), ["prompt set (hash)"]),
        (dict(hooks=[HOOK, "blocks.0.hook_mlp_out"]), ["hooks"]),
        (dict(dtype="bfloat16"), ["dtype"]),
        (dict(positions="prompt", dtype="bfloat16"), ["dtype", "positions"]),
        (dict(chat_format="raw"), ["tokenised rows (tokenizer or chat format)"]),
    ]
    for change, named in cases:
        kw = {"model": tiny_model, "prompts": prompts_file, **change}
        with pytest.raises(StoreError, match="cannot resume") as info:
            _cache(kw.pop("model"), kw.pop("prompts"), out, **kw)
        for label in named:
            assert label in str(info.value), (change, str(info.value))
        assert str(info.value).count(": store has") == len(named), str(info.value)  # nothing else named
        assert "--overwrite" in str(info.value)
        assert store_files(out) == before  # nothing touched
    result = _cache(other_model, prompts_file, out, overwrite=True)
    assert result.shards_reused == 0 and open_store(out).manifest["model"]["fingerprint"] != json.loads(
        before["manifest.json"])["model"]["fingerprint"]


def test_corrupted_or_truncated_shard_is_detected_on_open_and_recomputed(tiny_model, prompts_file, tmp_path):
    out = tmp_path / "s"
    _cache(tiny_model, prompts_file, out)
    good = store_files(out)
    shard = out / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-7] ^= 0x01  # one bit of one activation
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"shard-00001\.safetensors is corrupted.*re-run `misfeat cache`"):
        open_store(out)
    open_store(out, verify=False)  # size and header are intact: only the checksum sees it
    shard.write_bytes(bytes(data[:-100]))
    with pytest.raises(StoreError, match=r"shard-00001\.safetensors is truncated"):
        open_store(out, verify=False)
    shard.write_bytes(b"\xff" * 8 + bytes(data[8:]))
    with pytest.raises(StoreError, match="no valid safetensors header"):
        open_store(out, verify=False)
    shard.write_bytes(bytes(data))  # back to the one flipped bit
    (out / "shard-00002.safetensors").unlink()
    with pytest.raises(StoreError, match="shard-00002.safetensors is missing"):
        open_store(out, verify=False)
    result = _cache(tiny_model, prompts_file, out)  # the same call repairs it
    assert result.shards_written == 2 and store_files(out) == good


def test_full_disk_keeps_finished_shards_and_resume_completes(tiny_model, prompts_file, tmp_path, monkeypatch):
    reference = tmp_path / "ref"
    _cache(tiny_model, prompts_file, reference)
    out = tmp_path / "s"
    capacity = {"left": sum(len(b) for b in store_files(reference).values()) // 2}
    real_enter = shards_module.atomic_file.__enter__

    class FullDisk:  # a file on a disk with capacity["left"] bytes free
        def __init__(self, f):
            self.f = f

        def write(self, data):
            if len(memoryview(data).cast("B")) > capacity["left"]:
                self.f.write(bytes(memoryview(data).cast("B")[:capacity["left"]]))
                capacity["left"] = 0
                raise OSError(errno.ENOSPC, "No space left on device")
            capacity["left"] -= len(memoryview(data).cast("B"))
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

    monkeypatch.setattr(shards_module.atomic_file, "__enter__", lambda self: FullDisk(real_enter(self)))
    with pytest.raises(DiskFullError, match=r"no space left.*\d+ of \d+ shards are complete and safe.*re-run"):
        _cache(tiny_model, prompts_file, out)
    monkeypatch.undo()
    assert not list(out.glob("*.tmp")), "a temp file was left behind"
    partial = json.loads((out / "manifest.json").read_text())
    assert 0 < len(partial["shards"]) < partial["n_shards"]
    for record in partial["shards"]:  # every shard the manifest lists is whole
        shards_module.verify_shard(out, shards_module.ShardRecord.from_json(record))
    result = _cache(tiny_model, prompts_file, out)
    assert result.shards_reused == len(partial["shards"]) and store_files(out) == store_files(reference)


def test_fresh_start_clears_leftovers_and_fsync_path_writes_the_same_bytes(tiny_model, prompts_file, tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    (out / "shard-00099.safetensors").write_bytes(b"stale")
    (out / "shard-00000.safetensors.tmp").write_bytes(b"half")
    (out / "notes.txt").write_text("mine")
    _cache(tiny_model, prompts_file, out, fsync=True)
    _cache(tiny_model, prompts_file, tmp_path / "nofsync", fsync=False)
    assert (out / "notes.txt").read_text() == "mine"  # only store files are touched
    assert store_files(out) == {**store_files(tmp_path / "nofsync"), "notes.txt": b"mine"}


# --- torchrun ------------------------------------------------------------------------


def test_torchrun_two_ranks_write_one_store_equal_to_one_process(model_dir, prompts_file, tmp_path):
    common = ["--model", model_dir, "--prompts", str(prompts_file), "--hooks", f"{HOOK},blocks.0.hook_mlp_out",
              "--positions", "response", "--shard-mb", "0.005", "--no-fsync"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "misfeat", "cache", *common, "--out", str(tmp_path / "ddp")]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert main(["cache", *common, "--out", str(tmp_path / "one")]) == 0
    ddp, one = store_files(tmp_path / "ddp"), store_files(tmp_path / "one")
    assert not any(name.startswith("progress-") for name in ddp)  # journals merged and removed
    assert ddp == one
    store = open_store(tmp_path / "ddp")
    assert store.n_rows > 0 and len(store.shards) > 2


def test_model_load_error_leaves_no_store(tmp_path, prompts_file):
    with pytest.raises(Exception, match="does not exist"):
        load_model(str(tmp_path / "missing"))
    assert main(["cache", "--model", str(tmp_path / "missing"), "--prompts", str(prompts_file), "--hooks", HOOK,
                 "--out", str(tmp_path / "s")]) == 2
    assert not (tmp_path / "s" / "manifest.json").exists()
