"""The host side of the cache (issue 20): vectorised padding against ``collate``, the
tokenised-prompt cache, store versions (blake3 v2, sha256 v1) and their migration, the
reused shard buffers."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from misfeat.activations import cache_activations, migrate_store, open_store
from misfeat.activations import tokens as token_cache
from misfeat.activations.buffers import HostBuffers, release_spare_buffers
from misfeat.activations.plan import Tokenizing, encode_prompts
from misfeat.activations.producer import copy_rows, pad_right
from misfeat.activations.shards import ALIGN, StoreError, write_shard
from misfeat.data import PromptSet, collate, load_prompts
from tests.test_activations import write_prompts

pytestmark = pytest.mark.usefixtures("one_thread")
HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    return write_prompts(tmp_path_factory.mktemp("prompts") / "ragged.jsonl", 30, seed=3)


@pytest.fixture
def token_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MISFEAT_TOKEN_CACHE", str(tmp_path / "tokens"))
    return tmp_path / "tokens"


def store_files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.name != "summary.json"}


def test_pad_right_equals_collate(tiny_model, prompts_file):
    """The numpy padding is misfeat.data.collate (the definition of every mask), cut lengths included."""
    pset = load_prompts(prompts_file)
    enc = encode_prompts(pset.records, tiny_model, Tokenizing.of(tiny_model, pset, "all"))
    rng = np.random.default_rng(0)
    for _ in range(5):
        ps = rng.choice(len(enc), size=7, replace=False)
        lengths = np.maximum(1, enc.lengths[ps] - rng.integers(0, 3, size=7))  # causal cuts
        want = collate([enc.encoded(int(p), int(n)) for p, n in zip(ps, lengths, strict=True)], 0, "right")
        got = pad_right(enc, ps, lengths, 0)
        for name in ("tokens", "attention_mask", "prompt_mask", "response_mask", "last_mask"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name


def test_token_cache_skips_tokenising_and_writes_the_same_bytes(tiny_model, prompts_file, tmp_path, token_dir,
                                                              monkeypatch):
    cache_activations(tiny_model, prompts_file, [HOOK], tmp_path / "a", batch_tokens=64, shard_mb=0.01, fsync=False)
    files = list(token_dir.glob("*.npz"))
    assert len(files) == 1

    def no_tokenising(*args, **kwargs):
        raise AssertionError("tokenised although the token cache holds the set")

    with monkeypatch.context() as m:
        m.setattr("misfeat.activations.feeder.encode_prompts", no_tokenising)
        cache_activations(tiny_model, prompts_file, [HOOK], tmp_path / "b", batch_tokens=64, shard_mb=0.01,
                          fsync=False)
    assert store_files(tmp_path / "b") == store_files(tmp_path / "a")
    # a damaged cache file is a miss (tokenised again, file replaced), never wrong rows
    raw = bytearray(files[0].read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    files[0].write_bytes(bytes(raw))
    cache_activations(tiny_model, prompts_file, [HOOK], tmp_path / "c", batch_tokens=64, shard_mb=0.01, fsync=False)
    assert store_files(tmp_path / "c") == store_files(tmp_path / "a")
    assert token_cache.load(files[0].stem, len(load_prompts(prompts_file))) is not None
    # another tokenisation (no responses for positions='prompt'), another file
    cache_activations(tiny_model, prompts_file, [HOOK], tmp_path / "d", "prompt", fsync=False)
    assert len(list(token_dir.glob("*.npz"))) == 2


def test_token_cache_off(tiny_model, prompts_file, tmp_path, monkeypatch):
    monkeypatch.setenv("MISFEAT_TOKEN_CACHE", "off")
    assert token_cache.cache_dir() is None
    cache_activations(tiny_model, prompts_file, [HOOK], tmp_path / "s", fsync=False)
    assert open_store(tmp_path / "s").n_rows > 0


def test_store_versions_and_migration(tiny_model, prompts_file, tmp_path, token_dir):
    """Version 2 checksums are blake3; migrating to 1 gives the sha256 store an older misfeat
    reads (checked by hand with hashlib); back to 2 gives the original bytes."""
    out = tmp_path / "s"
    cache_activations(tiny_model, prompts_file, [HOOK], out, batch_tokens=64, shard_mb=0.01, fsync=False)
    original = store_files(out)
    doc = json.loads((out / "manifest.json").read_text())
    assert doc["version"] == 2 and all(s["checksum"].startswith("blake3:") for s in doc["shards"])
    assert migrate_store(out, 1) == len(doc["shards"]) > 1
    v1 = json.loads((out / "manifest.json").read_text())
    assert v1["version"] == 1
    for s in v1["shards"]:
        assert s["checksum"] == "sha256:" + hashlib.sha256((out / s["file"]).read_bytes()).hexdigest()
    rows = open_store(out, verify=True).rows(HOOK, slice(None))
    assert migrate_store(out, 2) == len(doc["shards"])
    assert store_files(out) == original
    assert torch.equal(open_store(out).rows(HOOK, slice(None)), rows)
    # a damaged shard is never re-hashed into a valid-looking one
    shard = out / doc["shards"][0]["file"]
    raw = bytearray(shard.read_bytes())
    raw[-3] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match="corrupted"):
        migrate_store(out, 1)
    with pytest.raises(StoreError, match="version=3"):
        migrate_store(out, 3)


def test_host_buffers_are_reused(monkeypatch):
    pool = HostBuffers({"h": 8}, torch.bfloat16, 2, pin=False)
    a = pool.acquire(100)
    assert a.hooks["h"].shape[0] > 100 and a.hooks["h"].dtype == torch.bfloat16 and a.spares["h"] >= 100
    assert a.block.data_ptr() % ALIGN == 0  # O_DIRECT writes from it
    a.hooks["h"][:100] = 1.5
    pool.release(a)
    b = pool.acquire(90)  # the most recently released block comes back, not a fresh one
    assert b.block.data_ptr() == a.block.data_ptr()
    c = pool.acquire(10)
    assert c.block.data_ptr() != b.block.data_ptr()
    pool.release(c)
    assert pool.acquire(10_000).hooks["h"].shape[0] > 10_000  # grows for a larger shard


@pytest.mark.parametrize("rows", [1, 7, 100, 341, 1000])
def test_shard_image_spare_row_lies_past_the_file(rows):
    """Every hook's view: rows [0, rows) are its tensor's bytes in the file, row ``spare`` lies
    past the file's page-rounded end (the padding never lands in the file) and inside the block."""
    widths = {"a": 8, "b": 3, "c": 5}
    image = HostBuffers(widths, torch.float32, 1, pin=False).acquire(rows)
    base = image.block.data_ptr()
    end = image.layout.size + (-image.layout.size % ALIGN)
    for h, d in widths.items():
        view = image.hooks[h]
        assert view.shape == (image.spares[h] + 1, d)
        assert view.data_ptr() - base == image.layout.spans[h][0]
        assert image.layout.spans[h][1] - image.layout.spans[h][0] == rows * d * 4
        assert view[-1].data_ptr() - base >= end
        assert view[-1].data_ptr() - base + d * 4 <= image.block.numel()


@pytest.mark.parametrize(("src", "dst"), [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
                                          (torch.float32, torch.bfloat16)])
def test_copy_rows_equals_index_copy(src, dst):
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(50, 12, generator=g).to(src)
    index = torch.randperm(40, generator=g)[:50 - 10]
    index = torch.cat([index, torch.full((10,), 40)])  # padding: every one to the spare last row
    expect = torch.zeros(41, 12, dtype=dst).index_copy_(0, index[:40], rows[:40].to(dst))
    got = torch.zeros(41, 12, dtype=dst)
    copy_rows(got, index, rows)
    assert torch.equal(got[:40], expect[:40])
    strided = torch.zeros(12, 41, dtype=dst).t()  # not contiguous: torch's own index_copy_
    copy_rows(strided, index[:40], rows[:40])
    assert torch.equal(strided[:40], expect[:40])


def test_spare_buffers_pass_to_the_next_run():
    release_spare_buffers()
    first = HostBuffers({"a": 8, "b": 4}, torch.float32, 2, pin=False)
    a = first.acquire(100)
    assert a.hooks["a"].shape[0] > 100 and a.hooks["b"].shape == (a.spares["b"] + 1, 4) and a.hooks["a"].is_contiguous()
    first.release(a)
    first.close()
    second = HostBuffers({"a": 8, "b": 4}, torch.float32, 2, pin=False)
    b = second.acquire(90)  # the memory of the first pool, not a fresh allocation
    assert b.block.data_ptr() == a.block.data_ptr()
    assert second.acquire(90).block.data_ptr() != b.block.data_ptr()  # only what was left is shared
    assert release_spare_buffers() == 0  # nothing is spare while the second pool holds it
    second.release(b)
    grown = second.acquire(1000)  # b was too small: its memory is not kept to the end of the run
    assert grown.hooks["a"].shape[0] > 1000 and len(second._blocks) == 2
    second.close()
    assert release_spare_buffers() == grown.block.numel() + a.block.numel() > 0 and release_spare_buffers() == 0


def test_shard_memory_is_handed_back_before_the_fsync(tmp_path, monkeypatch):
    events = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    tensors = {"h": torch.randn(6, 4), "prompt_index": torch.arange(6), "position": torch.arange(6).int(),
               "token_id": torch.arange(6).int()}
    write_shard(tmp_path / "s.safetensors", tensors, done_reading=lambda: events.append("done"))
    assert events == ["done", "fsync"]
    from safetensors.torch import load_file

    assert torch.equal(load_file(tmp_path / "s.safetensors")["h"], tensors["h"])
    head = int.from_bytes((tmp_path / "s.safetensors").read_bytes()[:8], "little")
    assert (8 + head) % ALIGN == 0  # the data starts on a page: O_DIRECT writes it from aligned memory


def _o_direct_works(directory: Path) -> bool:
    try:
        fd = os.open(directory / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT)
    except (OSError, AttributeError):
        return False
    os.close(fd)
    return True


@pytest.mark.parametrize("positions", ["all", "response"])  # rows copied straight in; gathered then copied
def test_direct_io_writes_the_bytes_of_a_buffered_write(tiny_model, prompts_file, tmp_path, monkeypatch, positions):
    """With fsync the shards go to the disk with O_DIRECT from the in-memory image; the store is
    byte for byte the buffered one (several hooks of different widths: each hook's padding row
    lies outside the file), every shard loads in safetensors and verifies."""
    from safetensors.torch import load_file

    from misfeat.activations import image as shards
    from tests.test_activations import HOOKS

    if not _o_direct_works(tmp_path):
        pytest.skip("this filesystem does not do O_DIRECT")
    monkeypatch.setitem(shards._DIRECT, "ok", True)
    opened = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda p, flags, *a: (opened.append(bool(flags & os.O_DIRECT)),
                                                          real_open(p, flags, *a))[1])
    kw = {"batch_tokens": 64, "shard_mb": 0.01}
    cache_activations(tiny_model, prompts_file, HOOKS, tmp_path / "direct", positions, fsync=True, **kw)
    n_direct = sum(opened)
    cache_activations(tiny_model, prompts_file, HOOKS, tmp_path / "buffered", positions, fsync=False, **kw)
    store = open_store(tmp_path / "direct", verify=True)
    assert n_direct == len(store.shards) > 2 and shards._DIRECT["ok"]
    assert store_files(tmp_path / "direct") == store_files(tmp_path / "buffered")
    start = 0
    for record in store.shards:
        loaded = load_file(tmp_path / "direct" / record.file)
        for hook in HOOKS:
            assert torch.equal(loaded[hook], store.rows(hook, slice(start, start + record.rows)))
        start += record.rows


def test_direct_io_refused_falls_back_to_buffered_writes(tiny_model, prompts_file, tmp_path, monkeypatch):
    import errno

    from misfeat.activations import image as shards

    monkeypatch.setitem(shards._DIRECT, "ok", True)
    real_open = os.open

    def no_direct(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_direct)
    cache_activations(tiny_model, prompts_file, [HOOK], tmp_path / "a", batch_tokens=64, shard_mb=0.01)
    assert not shards._DIRECT["ok"]
    cache_activations(tiny_model, prompts_file, [HOOK], tmp_path / "b", batch_tokens=64, shard_mb=0.01, fsync=False)
    assert store_files(tmp_path / "a") == store_files(tmp_path / "b")
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.endswith(".tmp")]


def test_progress_log_defers_only_while_busy_and_flush_records_everything(tmp_path):
    from misfeat.activations.shards import ShardRecord
    from misfeat.activations.store import ProgressLog

    log = ProgressLog(tmp_path, {"n_shards": 4, "shards": []}, {}, rank=0, world_size=1, fsync=False,
                      interval=3600)

    def listed() -> list[int]:
        return [s["index"] for s in json.loads((tmp_path / "manifest.json").read_text())["shards"]]

    records = [ShardRecord(i, f"shard-{i:05d}.safetensors", i, i + 1, 1, 1, 1, "blake3:00") for i in range(4)]
    log(records[0], busy=True)  # the first is always written
    log(records[2], busy=True)  # out of order, more shards queued: deferred
    assert listed() == [0]
    log.flush()
    assert listed() == [0, 2]
    log(records[1], busy=False)  # the writer would idle anyway: written at once
    assert listed() == [0, 1, 2]
    log(records[3], busy=True)  # the last: written, complete
    doc = json.loads((tmp_path / "manifest.json").read_text())
    assert doc["complete"] is True and listed() == [0, 1, 2, 3] and log.wrote_complete


def test_prompt_file_read_again_is_neither_parsed_nor_hashed(tiny_model, prompts_file, tmp_path, token_dir,
                                                            monkeypatch):
    """A JSONL file read before (same bytes) gives the same manifest and store without parsing a
    line; an edited file is read, hashed and tokenised again."""
    from misfeat.activations import prompt_files

    path = tmp_path / "p.jsonl"
    path.write_bytes(prompts_file.read_bytes())
    fresh = load_prompts(path)
    first = cache_activations(tiny_model, path, [HOOK], tmp_path / "a", batch_tokens=64, shard_mb=0.01, fsync=False)

    def no_parsing(*args, **kwargs):
        raise AssertionError("parsed a prompt file whose bytes are indexed")

    with monkeypatch.context() as m:
        m.setattr(prompt_files, "parse_jsonl", no_parsing)
        m.setattr("misfeat.activations.feeder.encode_prompts", no_parsing)
        indexed = prompt_files.read_prompt_file(path)
        assert isinstance(indexed, prompt_files.IndexedPromptFile)
        assert (len(indexed), indexed.hash, indexed.any_response, indexed.name) == (
            len(fresh), fresh.hash, fresh.any_response, fresh.name)
        cache_activations(tiny_model, path, [HOOK], tmp_path / "b", batch_tokens=64, shard_mb=0.01, fsync=False)
    assert store_files(tmp_path / "b") == store_files(tmp_path / "a")
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["prompts"]["hash"] == fresh.hash
    assert indexed.records == fresh.records  # parsed on first use, from the indexed bytes

    # edited: one word of one prompt; the run must see it
    lines = path.read_text().splitlines()
    record = json.loads(lines[0])
    record["prompt"] += " again"
    path.write_text("\n".join([json.dumps(record), *lines[1:]]) + "\n")
    edited = load_prompts(path)
    assert edited.hash != fresh.hash
    assert type(prompt_files.read_prompt_file(path)) is PromptSet  # a miss: parsed
    second = cache_activations(tiny_model, path, [HOOK], tmp_path / "c", batch_tokens=64, shard_mb=0.01,
                               fsync=False)
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["prompts"]["hash"] == edited.hash
    assert second.n_rows == first.n_rows + 1  # one more token of prompt 0
    monkeypatch.setenv("MISFEAT_TOKEN_CACHE", "off")
    cache_activations(tiny_model, path, [HOOK], tmp_path / "d", batch_tokens=64, shard_mb=0.01, fsync=False)
    assert store_files(tmp_path / "c") == store_files(tmp_path / "d")


def test_indexed_prompt_file_refuses_bytes_changed_after_the_lookup(tmp_path, token_dir):
    from misfeat.activations import prompt_files
    from misfeat.errors import PromptFileError

    path = write_prompts(tmp_path / "p.jsonl", 5)
    prompt_files.read_prompt_file(path)
    indexed = prompt_files.read_prompt_file(path)
    assert isinstance(indexed, prompt_files.IndexedPromptFile)
    path.write_text(path.read_text().replace('"p0"', '"q0"'))
    with pytest.raises(PromptFileError, match="changed"):
        indexed.records  # noqa: B018
    # a damaged index file is a miss, not a wrong hash
    for f in (token_dir / "files").glob("*.json"):
        f.write_text("{not json")
    again = prompt_files.read_prompt_file(path)
    assert type(again) is not prompt_files.IndexedPromptFile and again.hash == load_prompts(path).hash
