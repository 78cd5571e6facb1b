"""The reader: rows by index, prompt, domain and label; shuffled batches through a bounded
buffer (every row once per epoch, ranks disjoint and complete); prompt-set reloading."""

from __future__ import annotations

import tracemalloc
from collections import Counter

import pytest
import torch

from misfeat.activations import StoreError, cache_activations, open_store
from misfeat.data import load_prompts
from misfeat.errors import MisfeatError
from tests.test_activations import write_prompts

HOOKS = ["blocks.1.hook_resid_post", "blocks.0.hook_mlp_out"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    return write_prompts(tmp_path_factory.mktemp("p") / "p.jsonl", 90)


@pytest.fixture(scope="module")
def store(tiny_model, prompts_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("store")
    cache_activations(tiny_model, prompts_file, HOOKS, out, "all", shard_mb=0.02, fsync=False)
    return open_store(out)


def row_counter(rows: torch.Tensor) -> Counter:
    """Rows as a multiset of their exact bytes (rows at BOS repeat across prompts)."""
    return Counter(bytes(r) for r in rows.contiguous().view(torch.uint8).numpy())


def test_store_describes_itself(store, prompts_file):
    assert store.hooks == HOOKS and store.d == 32 and store.d_of(HOOKS[1]) == 32
    assert store.dtype == torch.float32 and store.positions == "all" and len(store.shards) > 3
    assert store.n_rows == len(store) == int(store.manifest["n_rows"]) == len(store.row_meta.token_id)
    assert store.prompts is not None and store.prompts.hash == load_prompts(prompts_file).hash
    with pytest.raises(StoreError, match="holds no hook"):
        store.rows("blocks.0.hook_resid_pre", [0])


def test_rows_by_index_slice_and_tensor_agree(store):
    hook = HOOKS[0]
    every = store.rows(hook, slice(None))
    assert every.shape == (store.n_rows, 32)
    idx = torch.tensor([store.n_rows - 1, 0, 17, 17, store.shards[0].rows])  # unsorted, repeated, across shards
    assert torch.equal(store.rows(hook, idx), every[idx])
    assert torch.equal(store.rows(hook, [3, -1]), every[[3, -1]])
    assert torch.equal(store.rows(hook, 5), every[5]) and store.rows(hook, 5).shape == (32,)
    assert torch.equal(store.rows(hook, slice(10, 40, 3)), every[10:40:3])
    assert store.rows(hook, []).shape == (0, 32)
    with pytest.raises(IndexError):
        store.rows(hook, [store.n_rows])


def test_rows_by_prompt_domain_and_label(store):
    hook = HOOKS[1]
    meta = store.row_meta
    rows = store.row_indices_for_prompts([7, 2])
    assert meta.prompt_index[rows].tolist() == [7] * int((meta.prompt_index == 7).sum()) + [2] * int(
        (meta.prompt_index == 2).sum())
    assert torch.equal(store.rows_for_prompts(hook, [7, 2]), store.rows(hook, rows))
    health = [i for i, r in enumerate(store.prompts) if r.domain == "health"]
    assert torch.equal(store.rows_where(hook, domain="health"), store.rows_for_prompts(hook, health))
    both = [i for i, r in enumerate(store.prompts) if r.domain in ("car", "money") and r.label == "aligned"]
    assert torch.equal(store.rows_where(hook, domain=["car", "money"], label="aligned"),
                       store.rows_for_prompts(hook, both))
    assert store.rows_where(hook, domain="nowhere").shape == (0, 32)


def test_shuffled_batches_cover_every_row_once_per_epoch(store):
    hook = HOOKS[0]
    every = store.rows(hook, slice(None))
    batches = list(store.batches(hook, 64, buffer_rows=256, seed=1, epochs=2))
    n_per_epoch = -(-store.n_rows // 64)
    assert len(batches) == 2 * n_per_epoch
    assert all(b.shape == (64, 32) for b in batches[:n_per_epoch - 1])
    first, second = torch.cat(batches[:n_per_epoch]), torch.cat(batches[n_per_epoch:])
    assert row_counter(first) == row_counter(every) == row_counter(second)
    assert not torch.equal(first, every) and not torch.equal(first, second)  # shuffled, differently per epoch
    again = torch.cat(list(store.batches(hook, 64, buffer_rows=256, seed=1)))
    assert torch.equal(again, first)  # seeded
    dropped = list(store.batches(hook, 64, buffer_rows=256, drop_last=True))
    assert all(b.shape[0] == 64 for b in dropped) and len(dropped) == store.n_rows // 64


def test_unshuffled_batches_are_the_store_in_order_and_cast(store):
    every = store.rows(HOOKS[1], slice(None))
    batches = list(store.batches(HOOKS[1], 100, shuffle=False, buffer_rows=200, dtype=torch.float64))
    assert batches[0].dtype == torch.float64
    assert torch.equal(torch.cat(batches), every.double())


def test_rank_split_is_disjoint_and_complete(store):
    hook = HOOKS[0]
    parts = [torch.cat(list(store.batches(hook, 32, buffer_rows=64, seed=3, rank=r, world_size=3)))
             for r in range(3)]
    assert all(len(p) > 0 for p in parts)
    assert sum(len(p) for p in parts) == store.n_rows
    assert sum((row_counter(p) for p in parts), Counter()) == row_counter(store.rows(hook, slice(None)))
    with pytest.raises(MisfeatError, match="rank"):
        store.batches(hook, 32, rank=3, world_size=3)
    with pytest.raises(MisfeatError, match="two batches"):
        store.batches(hook, 32, buffer_rows=40)


def test_batches_memory_is_bounded_by_the_buffer(tiny_model, tmp_path):
    """Peak Python/numpy memory while streaming a store 8x larger than the buffer stays near
    the buffer size (batches are read with file reads, not mapped)."""
    prompts = write_prompts(tmp_path / "big.jsonl", 1200, max_words=40)
    cache_activations(tiny_model, prompts, ["blocks.1.hook_resid_post"], tmp_path / "s", fsync=False)
    store = open_store(tmp_path / "s", verify=False)
    store_bytes = store.n_rows * 32 * 4
    buffer_rows = 2048
    assert store_bytes > 8 * buffer_rows * 32 * 4
    tracemalloc.start()
    n = sum(len(b) for b in store.batches("blocks.1.hook_resid_post", 256, buffer_rows=buffer_rows))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert n == store.n_rows
    assert peak < 4 * buffer_rows * 32 * 4 + (1 << 20) and peak < store_bytes / 3


def test_prompts_unavailable_says_why_and_can_be_attached(tiny_model, tmp_path):
    pset = load_prompts(write_prompts(tmp_path / "p.jsonl", 6))
    in_memory = type(pset)("made-in-code", pset.records, {})
    cache_activations(tiny_model, in_memory, HOOKS[:1], tmp_path / "s", fsync=False)
    store = open_store(tmp_path / "s")
    assert store.prompts is None and "in-memory prompt set" in store.prompts_error
    with pytest.raises(StoreError, match="unavailable: the store was made from an in-memory"):
        store.rows_where(HOOKS[0], domain="health")
    attached = open_store(tmp_path / "s", prompts=in_memory)
    assert attached.rows_where(HOOKS[0], domain="health").shape[0] > 0
    other = load_prompts(write_prompts(tmp_path / "q.jsonl", 7))
    with pytest.raises(StoreError, match="is not the one"):
        open_store(tmp_path / "s", prompts=other)


def test_open_store_errors_are_clear(tmp_path, tiny_model):
    with pytest.raises(StoreError, match="not an activation store"):
        open_store(tmp_path)
    prompts = write_prompts(tmp_path / "p.jsonl", 5)
    from misfeat.activations import cache_models
    from misfeat.models import save_model

    save_model(tiny_model, tmp_path / "m")
    cache_models([str(tmp_path / "m"), str(tmp_path / "m")], prompts, HOOKS[:1], tmp_path / "multi")
    with pytest.raises(StoreError, match="several stores.*0-m, 1-m"):
        open_store(tmp_path / "multi")
