"""Cache a model's activations on a prompt set to disk: the entry point of the caching core.

Where it sits: models + data -> **cache** (producer -> store) -> reader -> SAE, diffing.

:func:`cache_activations` plans the shards (equal prompt ranges, sized from a sample),
resumes from the shards an earlier run finished, and runs the remaining ones (this
rank's share under torchrun) on three threads: the feeder tokenises and pads ahead, the
main thread runs the forward, the writer checksums and writes finished shards.
:func:`cache_models` does it for several checkpoints over the same prompts: one store per
model, row-aligned (row ``i`` is the same token of the same prompt in every store).
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from misfeat import registry
from misfeat.activations import distributed
from misfeat.activations import tokens as token_cache
from misfeat.activations.buffers import HostBuffers
from misfeat.activations.feeder import Feeder
from misfeat.activations.plan import (
    META_BYTES,
    Tokenizing,
    check_rows_possible,
    plan_shards,
    prompts_per_shard,
)
from misfeat.activations.producer import Capture, default_batch_tokens, fill_shard, hook_widths
from misfeat.activations.prompt_files import read_prompt_file
from misfeat.activations.shards import (
    MANIFEST_FILE,
    STORE_FORMAT,
    STORE_VERSION,
    DiskFullError,
    StoreError,
    is_store_file,
    remove_store_files,
    write_json_atomic,
)
from misfeat.activations.store import (
    CacheConfig,
    ProgressLog,
    ShardWriter,
    disk_full_message,
    read_journals,
    read_manifest,
    resume_records,
    with_shards,
)
from misfeat.data import PromptSet, load_prompts, pad_id_of
from misfeat.errors import MisfeatError

if TYPE_CHECKING:
    import torch
    from transformer_lens import HookedTransformer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CacheResult:
    """What one :func:`cache_activations` call did (``tokens`` and ``seconds``: this process, this run)."""

    path: Path
    model: str
    fingerprint: str
    n_prompts: int
    n_rows: int
    n_shards: int
    shards_written: int
    shards_reused: int
    tokens: int
    seconds: float
    rows_key: str

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")

    def summary(self) -> dict[str, Any]:
        return {"path": str(self.path), "model": self.model, "fingerprint": self.fingerprint,
                "n_prompts": self.n_prompts, "n_rows": self.n_rows, "n_shards": self.n_shards,
                "shards_written": self.shards_written, "shards_reused": self.shards_reused,
                "tokens": self.tokens, "seconds": round(self.seconds, 3),
                "tokens_per_s": round(self.tokens_per_s, 1)}


def resolve_prompts(prompts: str | os.PathLike | PromptSet) -> tuple[PromptSet, str | None]:
    """The prompt set and the spec that reloads it (recorded in the manifest; None if in memory)."""
    if isinstance(prompts, (str, os.PathLike)):
        text = str(prompts)
        if registry.for_spec(text):  # a plug-in's spec
            return load_prompts(text), text
        # a JSONL file: read before with the same bytes, it is neither parsed nor hashed again
        return read_prompt_file(text), str(Path(text).expanduser().resolve())
    pset = load_prompts(prompts)
    if pset.meta.get("path"):
        return pset, str(Path(pset.meta["path"]).resolve())
    return pset, (pset.name if registry.for_spec(pset.name) else None)


def cache_activations(
    model: HookedTransformer,
    prompts: str | os.PathLike | PromptSet,
    hooks: Sequence[str],
    out_dir: str | os.PathLike,
    positions: str = "all",
    *,
    dtype: str = "float32",
    batch_tokens: int | None = None,
    shard_mb: float | None = None,
    autocast: bool = False,
    overwrite: bool = False,
    chat_format: str = "auto",
    fsync: bool = True,
) -> CacheResult:
    """Cache ``hooks`` of ``model`` at ``positions`` of every prompt into the store ``out_dir``.

    ``prompts``: a prompt-set spec (``organism:heldout``), a JSONL path, or a
    :class:`PromptSet`. Resumes a store left by an interrupted run with the same
    settings; refuses one made differently unless ``overwrite``. See :class:`CacheConfig`
    for the options, ``docs/cache-format.md`` for the format.
    """
    cfg = CacheConfig(positions=positions, dtype=dtype, batch_tokens=batch_tokens,
                      shard_mb=CacheConfig.shard_mb if shard_mb is None else shard_mb, autocast=autocast,
                      overwrite=overwrite, chat_format=chat_format, fsync=fsync)
    pset, spec = resolve_prompts(prompts)
    return cache_with_config(model, pset, spec, hooks, Path(out_dir), cfg)


def cache_with_config(model: HookedTransformer, pset: PromptSet, prompt_spec: str | None,
                      hooks: Sequence[str], out: Path, cfg: CacheConfig) -> CacheResult:
    """:func:`cache_activations` with a loaded prompt set and a :class:`CacheConfig`."""
    started = time.perf_counter()
    check_rows_possible(pset, cfg.positions)
    widths = hook_widths(model, hooks)
    device = next(model.parameters()).device
    if cfg.autocast and device.type != "cuda":
        raise MisfeatError("autocast is a CUDA option (bfloat16 autocast on the GPU); drop it on "
                           f"{device.type}, or pass dtype='bfloat16' to store bfloat16 rows")
    dist = distributed.current(device.type)
    old = None if cfg.overwrite else read_manifest(out) if out.is_dir() else None
    batch_tokens = cfg.batch_tokens or default_batch_tokens(device.type)
    if old is not None and old.get("prompts_per_shard"):
        # the first run's batches and shard boundaries make the bytes: keep them
        if (old.get("batch_tokens"), old.get("shard_mb")) != (batch_tokens, cfg.shard_mb):
            logger.warning("resuming %s with its own batch_tokens=%s, shard_mb=%s (this run asked for %s, %s)",
                           out, old.get("batch_tokens"), old.get("shard_mb"), batch_tokens, cfg.shard_mb)
        batch_tokens = int(old["batch_tokens"])
    how = Tokenizing.of(model, pset, cfg.positions, cfg.chat_format)
    prompt_hash = pset.hash  # a property that hashes every record: compute it once
    token_key = token_cache.cache_key(prompt_hash, how.key(model), model.cfg.n_ctx)
    # tokenising (or loading the cached tokens) starts now, on the feeder's thread, while
    # this one does the set-up
    feeder = Feeder(pset, model, how, cfg.positions, pad_id=pad_id_of(model), batch_tokens=batch_tokens,
                    token_key=token_key, pin=device.type == "cuda")
    try:
        return _cache(model, pset, prompt_spec, widths, out, cfg, how, feeder, old, batch_tokens, dist, started,
                      prompt_hash)
    finally:
        feeder.close()


def _cache(model: HookedTransformer, pset: PromptSet, prompt_spec: str | None, widths: dict[str, int], out: Path,
           cfg: CacheConfig, how: Tokenizing, feeder: Feeder, old: dict[str, Any] | None, batch_tokens: int,
           dist: distributed.Dist, started: float, prompt_hash: str) -> CacheResult:
    from misfeat.models import fingerprint

    if old is not None and old.get("prompts_per_shard"):
        shard_mb, per_shard = float(old["shard_mb"]), int(old["prompts_per_shard"])
    else:
        itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[cfg.dtype]
        row_bytes = sum(widths.values()) * itemsize + META_BYTES
        shard_mb = cfg.shard_mb
        per_shard = prompts_per_shard(len(pset), feeder.mean_rows, row_bytes, int(shard_mb * 2**20))
    specs = plan_shards(len(pset), per_shard)
    mine = [s for s in specs if s.index % dist.world_size == dist.rank]
    if old is None:  # a fresh store, nothing to resume: the feeder pads the first shard while this
        feeder.set_shards(mine)  # thread fingerprints the model and clears the directory
    manifest = _manifest(model, fingerprint(model), pset, prompt_spec, widths, cfg, how, batch_tokens, prompt_hash)
    manifest.update(shard_mb=shard_mb, prompts_per_shard=per_shard, n_shards=len(specs))

    out.mkdir(parents=True, exist_ok=True)
    failure: BaseException | None = None
    done = {}
    try:
        done = resume_records(out, manifest, specs, overwrite=cfg.overwrite)
    except MisfeatError as err:
        failure = err
    if dist.any_true(failure is not None):
        raise failure or StoreError(f"another rank refused to resume {out}; see its error")
    if dist.rank == 0:
        stale = [p.name for p in out.iterdir() if p.name.endswith(".tmp") and is_store_file(p.name)]
        # a fresh start clears every store file; the manifest appears with the first shard
        removed = remove_store_files(out, stale if done else None)
        if removed:
            logger.info("removed %d leftover file(s) from %s", len(removed), out)
    dist.barrier()

    if old is None and done:
        raise StoreError(f"another run wrote a store into {out} meanwhile; run again")
    if old is not None:
        feeder.set_shards([s for s in mine if s.index not in done])
    log = ProgressLog(out, manifest, done, rank=dist.rank, world_size=dist.world_size, fsync=cfg.fsync)
    tokens = 0
    try:
        tokens = _run_shards(model, feeder, widths, cfg, out, log, show=dist.rank == 0)
    except BaseException as err:  # noqa: BLE001 - re-raised below, after the other ranks know
        failure = err
    if dist.any_true(failure is not None):
        if isinstance(failure, DiskFullError):
            raise DiskFullError(disk_full_message(failure, out, len(log.records), len(specs))) from failure
        raise failure or StoreError(f"another rank failed while caching into {out}; see its error; "
                                    "re-run the same command to resume")
    if dist.rank == 0 and not log.wrote_complete:
        records = dict(log.records)
        for record in read_journals(out):
            records.setdefault(record.index, record)
        missing = [s.index for s in specs if s.index not in records]
        if missing:
            raise StoreError(f"{out}: shards {missing[:5]} were not written; re-run the same command to resume")
        write_json_atomic(out / MANIFEST_FILE, with_shards(manifest, records, True), fsync=cfg.fsync)
        remove_store_files(out, [p.name for p in out.glob("progress-rank*.json")])
    dist.barrier()
    n_rows = sum(r.rows for r in log.records.values()) if dist.world_size == 1 else int(
        read_manifest(out)["n_rows"])
    return CacheResult(out, manifest["model"]["spec"], manifest["model"]["fingerprint"], len(pset), n_rows,
                       len(specs), len(log.mine), len(done), tokens, time.perf_counter() - started,
                       manifest["rows_key"])


def _run_shards(model: HookedTransformer, feeder: Feeder, widths: dict[str, int], cfg: CacheConfig, out: Path,
                log: ProgressLog, *, show: bool) -> int:
    """Run this process's shards as the feeder hands them over; returns the real tokens forwarded."""
    import torch

    from misfeat.io import progress
    from misfeat.models import resolve_dtype

    device = next(model.parameters()).device
    dtype = resolve_dtype(cfg.dtype)
    capture = Capture(model, list(widths), autocast=cfg.autocast)
    # two writers: one shard's fsync (disk time) overlaps the next one's hash and write; a
    # GPU outruns even that, so three there
    threads = 2 if device.type == "cpu" else 3
    writer = ShardWriter(out, log, depth=cfg.queue_shards, fsync=cfg.fsync, threads=threads,
                         cuda_device=device if device.type == "cuda" else None)
    # shard buffers are reused: filling a fresh one costs 2.7x the CPU time of refilling one
    # (a page fault per 4 KiB; measured at d 768, bfloat16); on CUDA they are page-locked,
    # for the copies from the GPU
    # At most one shard being filled plus one per writer on CPU (a full pool holds the forward
    # back like a full queue; the peak RSS of 4x the prompts grew 19% with a set per queue
    # slot too); on CUDA also one per queue slot, so the GPU runs ahead of the disk.
    sets = threads + 1 if device.type == "cpu" else cfg.queue_shards + threads + 1
    host = HostBuffers(widths, dtype, sets, pin=device.type == "cuda")
    # on CUDA the copies of a finished shard run on a side stream, overlapped with the next forward
    copier = torch.cuda.Stream(device) if device.type == "cuda" else None
    bar = progress(desc=f"cache {out.name}", unit="tok", unit_scale=True, disable=None if show else True)
    tokens = 0

    def on_batch(n: int) -> None:
        if bar.total is None and feeder.total_tokens is not None:
            bar.total = feeder.total_tokens  # known once the feeder has tokenised the whole set
        bar.update(n)
        feeder.check()  # a bad record deep in the set stops the run now, not at its shard

    try:
        for work in feeder:
            image = host.acquire(work.rows)  # the shard file laid out in memory
            if copier is None:  # the rows go straight into the image
                fill_shard(capture, work.batches, image.hooks, spares=image.spares, on_batch=on_batch)
                ready = None
            else:
                buffers = {h: torch.empty((work.rows + 1, d), dtype=dtype, device=device) for h, d in widths.items()}
                fill_shard(capture, work.batches, buffers, on_batch=on_batch)
                copier.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(copier):
                    for h in widths:
                        image.hooks[h][:work.rows].copy_(buffers[h][:work.rows], non_blocking=True)
                        buffers[h].record_stream(copier)  # not reused before the copy is done
                    ready = torch.cuda.Event()
                    ready.record(copier)
            tokens += work.tokens
            writer.submit(work.spec, image, work.meta, rows=work.rows, tokens=work.tokens, ready=ready,
                          release=lambda i=image: host.release(i))
    except BaseException:
        _keep_written(writer, log, closed=False)  # queued shards are still written whole, and recorded
        raise
    finally:
        bar.close()
    try:
        writer.close()
    except BaseException:
        _keep_written(writer, log, closed=True)
        raise
    host.close()  # every set is back: the next run in this process reuses them
    log.flush()
    return tokens


def _keep_written(writer: ShardWriter, log: ProgressLog, *, closed: bool) -> None:
    """On the way out with an error: finish the writer and record what it wrote; their own
    errors are logged, never raised over the first one."""
    try:
        if not closed:
            writer.close()
    except BaseException as err:  # noqa: BLE001 - the first error is the one to report
        logger.warning("shard writer: %s", err)
    try:
        log.flush()
    except BaseException as err:  # noqa: BLE001
        logger.warning("recording the finished shards: %s", err)


def _manifest(model: HookedTransformer, fingerprint: str, pset: PromptSet, prompt_spec: str | None,
              widths: dict[str, int], cfg: CacheConfig, how: Tokenizing, batch_tokens: int,
              prompt_hash: str) -> dict[str, Any]:
    """The manifest before any shard (the shard plan is added by the caller; ``n_rows`` and
    ``n_tokens`` when it is complete)."""
    import hashlib

    from misfeat import __version__
    from misfeat.models import architecture_fingerprint, dtype_name, model_info

    info = model_info(model)
    # rows are a function of the records, their tokenisation and the positions: equal keys,
    # equal rows (row i the same token of the same prompt), whatever the model
    rows_key = hashlib.sha256(f"{prompt_hash}|{how.key(model)}|{cfg.positions}".encode()).hexdigest()[:16]
    return {
        "format": STORE_FORMAT, "version": STORE_VERSION, "complete": False, "misfeat_version": __version__,
        "model": {"spec": info.spec, "source": info.source, "fingerprint": fingerprint,
                  "architecture": architecture_fingerprint(model),
                  "n_layers": model.cfg.n_layers, "d_model": model.cfg.d_model,
                  "dtype": dtype_name(model.cfg.dtype)},
        "prompts": {"spec": prompt_spec, "name": pset.name, "hash": prompt_hash, "n": len(pset),
                    "chat_format": how.chat_format},
        "hooks": [{"name": h, "d": d} for h, d in widths.items()],
        "dtype": cfg.dtype, "positions": cfg.positions, "autocast": cfg.autocast, "rows_key": rows_key,
        "n_rows": None, "n_tokens": None,
        "batch_tokens": batch_tokens, "shard_mb": None, "prompts_per_shard": None, "n_shards": None,
        "shards": [],
    }


# --- several checkpoints -------------------------------------------------------------


def store_dir_name(index: int, spec: str) -> str:
    """``<index>-<safe name>``: the directory of model ``index`` in a multi-model cache."""
    path = Path(spec).expanduser()
    name = path.name if path.is_dir() else spec
    return f"{index}-{re.sub(r'[^A-Za-z0-9._-]+', '_', name).strip('_')[:60] or 'model'}"


def cache_models(specs: Sequence[str], prompts: str | os.PathLike | PromptSet, hooks: Sequence[str],
                 out_dir: str | os.PathLike, config: CacheConfig = CacheConfig(), *,
                 device: str | torch.device | None = None, model_dtype: str | None = None) -> list[CacheResult]:
    """Cache each model spec over the same prompts, one model in memory at a time.

    One spec: the store is ``out_dir`` itself. Several: ``out_dir/<index>-<name>/`` per
    model, and ``out_dir/summary.json`` lists them with fingerprints and whether their
    rows are aligned (same tokenizer: row ``i`` is the same token in every store).
    """
    from misfeat.models import load_model

    if not specs:
        raise MisfeatError("no model given; pass one or more model specs")
    pset, prompt_spec = resolve_prompts(prompts)
    out = Path(out_dir)
    results = []
    for i, spec in enumerate(specs):
        model = load_model(spec, device=device, dtype=model_dtype)
        target = out if len(specs) == 1 else out / store_dir_name(i, spec)
        results.append(cache_with_config(model, pset, prompt_spec, hooks, target, config))
        del model
    if len(specs) > 1 and distributed.env().rank == 0:
        from misfeat.io import SUMMARY_FILE

        write_json_atomic(out / SUMMARY_FILE, multi_summary(results, out), fsync=config.fsync)
    return results


def multi_summary(results: Sequence[CacheResult], out: Path) -> dict[str, Any]:
    """The deterministic part of a multi-model cache's ``summary.json``."""
    return {
        "row_aligned": len({r.rows_key for r in results}) == 1,
        "stores": [{"model": r.model, "fingerprint": r.fingerprint, "path": os.path.relpath(r.path, out),
                    "n_rows": r.n_rows, "rows_key": r.rows_key} for r in results],
    }
