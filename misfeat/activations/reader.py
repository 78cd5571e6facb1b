"""Read an activation store: memory-mapped rows, row metadata, shuffled training batches.

Where it sits: store (disk) -> **reader** -> SAE trainer (:meth:`ActivationStore.batches`,
an ``Iterator[Tensor]``), feature analysis (rows by index, prompt, domain or label).

Random access (``rows``, ``rows_for_prompts``) goes through memory maps of the shards.
``batches`` reads chunks with plain file reads into one preallocated shuffle buffer, so
its memory is the buffer's, whatever the size of the store.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from misfeat.activations.shards import (
    MANIFEST_FILE,
    META_TENSORS,
    ShardRecord,
    StoreError,
    TensorEntry,
    verify_shard,
)
from misfeat.activations.store import read_manifest

if TYPE_CHECKING:
    import numpy as np
    import torch

    from misfeat.data import PromptSet

logger = logging.getLogger(__name__)

_NP = {"float32": "float32", "float16": "float16", "bfloat16": "uint16", "int64": "int64", "int32": "int32"}
_MAX_OPEN = 64  # memory maps kept open at once (each holds a file descriptor)


class RowMeta(NamedTuple):
    """Per row: the prompt it comes from, its position in the tokenised prompt, its token."""

    prompt_index: torch.Tensor  # int64 [n_rows]
    position: torch.Tensor  # int32 [n_rows]
    token_id: torch.Tensor  # int32 [n_rows]


def open_store(path: str | os.PathLike, verify: bool = True, *, prompts: Any = None) -> ActivationStore:
    """Open the store at ``path`` (memory-mapped).

    Always checks each shard's size and safetensors header against the manifest;
    ``verify=True`` (default) also recomputes every checksum (a full read of the store;
    pass ``verify=False`` to skip it on large stores). ``prompts``: the prompt set to
    attach when the one recorded in the manifest cannot be reloaded (it must hash equal).
    """
    path = Path(path)
    manifest = read_manifest(path) if path.is_dir() else None
    if manifest is None:
        if (path / "summary.json").is_file() and any(p.is_dir() for p in path.iterdir()):
            subs = ", ".join(sorted(p.name for p in path.iterdir() if (p / MANIFEST_FILE).is_file()))
            raise StoreError(f"{path} holds several stores (a multi-model cache), not one: open one of "
                             f"{subs or 'its subdirectories'}")
        raise StoreError(f"{path} is not an activation store (no {MANIFEST_FILE}); create one with "
                         "`misfeat cache` or misfeat.activations.cache_activations")
    if not manifest.get("complete"):
        raise StoreError(
            f"{path} is incomplete ({len(manifest.get('shards', []))} of {manifest.get('n_shards')} shards "
            "written): re-run `misfeat cache` with the same arguments to finish it"
        )
    records = [ShardRecord.from_json(r) for r in manifest["shards"]]
    hooks = {h["name"]: int(h["d"]) for h in manifest["hooks"]}
    entries = []
    for record in records:
        found = verify_shard(path, record, checksum=verify)
        for hook, d in hooks.items():
            entry = found.get(hook)
            if entry is None or entry.shape != (record.rows, d) or entry.dtype != manifest["dtype"]:
                raise StoreError(f"shard {path / record.file} does not hold {hook} as [{record.rows}, {d}] "
                                 f"{manifest['dtype']}; delete it and re-run `misfeat cache` with the same "
                                 "arguments")
        entries.append(found)
    store = ActivationStore(path, manifest, records, entries)
    if prompts is not None:
        store.attach_prompts(prompts)
    return store


class ActivationStore:
    """A cached activation store (see ``docs/cache-format.md``); use :func:`open_store`."""

    def __init__(self, path: Path, manifest: dict[str, Any], records: list[ShardRecord],
                 entries: list[dict[str, TensorEntry]]):
        import numpy as np

        self.path, self.manifest = path, manifest
        self.shards = records
        self._entries = entries
        self._widths = {h["name"]: int(h["d"]) for h in manifest["hooks"]}
        self._row_start = np.zeros(len(records) + 1, dtype=np.int64)
        np.cumsum([r.rows for r in records], out=self._row_start[1:])
        self._maps: OrderedDict[int, np.ndarray] = OrderedDict()
        self._prompt_offsets: np.ndarray | None = None
        self._prompts: PromptSet | None = None
        self._prompts_loaded = False
        self.prompts_error: str | None = None
        self._row_meta: RowMeta | None = None

    # --- what it holds ---------------------------------------------------------------

    @property
    def hooks(self) -> list[str]:
        return list(self._widths)

    def d_of(self, hook: str) -> int:
        self._check_hook(hook)
        return self._widths[hook]

    @property
    def d(self) -> int:
        """The row width when every hook has the same one (else use :meth:`d_of`)."""
        widths = set(self._widths.values())
        if len(widths) != 1:
            raise StoreError(f"hooks of {self.path} have different widths {self._widths}; use d_of(hook)")
        return widths.pop()

    @property
    def n_rows(self) -> int:
        return int(self._row_start[-1])

    def __len__(self) -> int:
        return self.n_rows

    @property
    def dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.manifest["dtype"])

    @property
    def positions(self) -> str:
        return self.manifest["positions"]

    @property
    def n_prompts(self) -> int:
        return int(self.manifest["prompts"]["n"])

    def __repr__(self) -> str:
        return (f"ActivationStore({str(self.path)!r}, model={self.manifest['model']['spec']!r}, "
                f"hooks={self.hooks}, rows={self.n_rows}, dtype={self.manifest['dtype']}, "
                f"positions={self.positions!r})")

    # --- the prompt set ----------------------------------------------------------------

    @property
    def prompts(self) -> PromptSet | None:
        """The prompt set the store was made from, reloaded from the manifest's spec; None
        when it cannot be (``prompts_error`` says why; pass ``prompts=`` to :func:`open_store`)."""
        if not self._prompts_loaded:
            self._prompts, self.prompts_error = _reload_prompts(self.manifest["prompts"])
            self._prompts_loaded = True
        return self._prompts

    def attach_prompts(self, prompts: Any) -> None:
        from misfeat.data import load_prompts

        pset = load_prompts(prompts)
        if pset.hash != self.manifest["prompts"]["hash"]:
            raise StoreError(f"prompt set {pset.name!r} (hash {pset.hash}) is not the one {self.path} was made "
                             f"from (hash {self.manifest['prompts']['hash']})")
        self._prompts, self.prompts_error, self._prompts_loaded = pset, None, True

    # --- random access ---------------------------------------------------------------

    def _check_hook(self, hook: str) -> None:
        if hook not in self._widths:
            raise StoreError(f"{self.path} holds no hook {hook!r}; it holds {', '.join(self._widths)}")

    def _view(self, shard: int, name: str) -> np.ndarray:
        import numpy as np

        if shard not in self._maps:
            if len(self._maps) >= _MAX_OPEN:
                self._maps.popitem(last=False)
            self._maps[shard] = np.memmap(self.path / self.shards[shard].file, dtype=np.uint8, mode="r")
        self._maps.move_to_end(shard)
        e = self._entries[shard][name]
        return self._maps[shard][e.start:e.end].view(_NP[e.dtype]).reshape(e.shape)

    def _gather(self, hook: str, idx: np.ndarray) -> np.ndarray:
        """Rows ``idx`` (any order, repeats allowed) of ``hook``, read shard by shard."""
        import numpy as np

        out = np.empty((len(idx), self._widths[hook]), dtype=_NP[self.manifest["dtype"]])
        if len(idx) == 0:
            return out
        shard_of = np.searchsorted(self._row_start, idx, side="right") - 1
        order = np.argsort(shard_of, kind="stable")
        bounds = np.searchsorted(shard_of[order], np.arange(len(self.shards) + 1))
        for s in np.flatnonzero(np.diff(bounds)):
            sel = order[bounds[s]:bounds[s + 1]]
            out[sel] = self._view(int(s), hook)[idx[sel] - self._row_start[s]]
        return out

    def _indices(self, index: Any) -> np.ndarray:
        import numpy as np

        if isinstance(index, slice):
            return np.arange(*index.indices(self.n_rows), dtype=np.int64)
        idx = np.asarray(index.cpu() if hasattr(index, "cpu") else index)
        if idx.dtype == bool:
            raise TypeError("rows() takes row indices, not a boolean mask; use mask.nonzero()")
        idx = idx.astype(np.int64).reshape(-1)
        if len(idx) and (idx.min() < -self.n_rows or idx.max() >= self.n_rows):
            raise IndexError(f"row index out of range for a store of {self.n_rows} rows")
        return np.where(idx < 0, idx + self.n_rows, idx)

    def rows(self, hook: str, index: Any) -> torch.Tensor:
        """Rows of ``hook`` by index (int, slice, sequence, array or tensor): ``[n, d]``
        (``[d]`` for an int), in the store's dtype, copied out of the memory map."""
        self._check_hook(hook)
        scalar = isinstance(index, int) or (hasattr(index, "ndim") and index.ndim == 0)
        out = _tensor(self._gather(hook, self._indices(index)), self.manifest["dtype"])
        return out[0] if scalar else out

    @property
    def row_meta(self) -> RowMeta:
        """``prompt_index``, ``position``, ``token_id`` of every row (loaded once: 16 bytes a row)."""
        import numpy as np
        import torch

        if self._row_meta is None:
            parts = [np.concatenate([np.asarray(self._view(s, name)) for s in range(len(self.shards))])
                     if self.shards else np.zeros(0) for name in META_TENSORS]
            self._row_meta = RowMeta(*(torch.from_numpy(p.copy()) for p in parts))
        return self._row_meta

    def prompt_row_offsets(self) -> np.ndarray:
        """``[n_prompts + 1]``: prompt ``p`` owns rows ``[off[p], off[p+1])`` (rows are in prompt order)."""
        import numpy as np

        if self._prompt_offsets is None:
            off = np.zeros(self.n_prompts + 1, dtype=np.int64)
            for s, record in enumerate(self.shards):
                pi = self._view(s, "prompt_index")
                bounds = np.searchsorted(pi, np.arange(record.first_prompt, record.end_prompt + 1))
                off[record.first_prompt:record.end_prompt + 1] = bounds + self._row_start[s]
            self._prompt_offsets = off
        return self._prompt_offsets

    def row_indices_for_prompts(self, prompt_indices: Sequence[int] | Any) -> torch.Tensor:
        """Store rows of the given prompts, each prompt's rows in position order."""
        import numpy as np
        import torch

        ps = np.asarray(prompt_indices.cpu() if hasattr(prompt_indices, "cpu") else prompt_indices,
                        dtype=np.int64).reshape(-1)
        if len(ps) and (ps.min() < 0 or ps.max() >= self.n_prompts):
            raise IndexError(f"prompt index out of range for a store of {self.n_prompts} prompts")
        off = self.prompt_row_offsets()
        counts = off[ps + 1] - off[ps]
        idx = np.arange(int(counts.sum()), dtype=np.int64) + np.repeat(off[ps] - (np.cumsum(counts) - counts), counts)
        return torch.from_numpy(idx)

    def rows_for_prompts(self, hook: str, prompt_indices: Sequence[int] | Any) -> torch.Tensor:
        return self.rows(hook, self.row_indices_for_prompts(prompt_indices))

    def prompt_indices_where(self, domain: str | Sequence[str] | None = None,
                             label: str | Sequence[str] | None = None) -> list[int]:
        pset = self.prompts
        if pset is None:
            raise StoreError(f"rows by domain/label need the prompt set, which is unavailable: {self.prompts_error}")
        domains = {domain} if isinstance(domain, str) else set(domain) if domain is not None else None
        labels = {label} if isinstance(label, str) else set(label) if label is not None else None
        return [i for i, r in enumerate(pset.records)
                if (domains is None or r.domain in domains) and (labels is None or r.label in labels)]

    def rows_where(self, hook: str, domain: str | Sequence[str] | None = None,
                   label: str | Sequence[str] | None = None) -> torch.Tensor:
        """Rows of the prompts with this domain and/or label (in prompt order)."""
        return self.rows_for_prompts(hook, self.prompt_indices_where(domain, label))

    # --- training batches --------------------------------------------------------------

    def batches(self, hook: str, batch_size: int, *, shuffle: bool = True, buffer_rows: int | None = None,
                seed: int = 0, epochs: int = 1, rank: int = 0, world_size: int = 1,
                dtype: torch.dtype | None = None, drop_last: bool = False) -> Iterator[torch.Tensor]:
        """``[batch_size, d]`` batches of ``hook`` for ``epochs`` passes (the SAE trainer's input).

        Chunks of rows are read in a seeded random order into a shuffle buffer of
        ``buffer_rows`` rows and drawn from it at random, so memory is bounded by the
        buffer. Every row comes out exactly once per epoch; the last batch of an epoch
        may be short unless ``drop_last``. With ``world_size > 1`` (data-parallel
        training) rank ``r`` reads chunks ``r, r + world_size, ...`` of the permuted
        order: disjoint and, over all ranks, complete. ``dtype`` default: float32.
        """
        from misfeat.activations.batches import BatchPlan, iterate

        self._check_hook(hook)
        plan = BatchPlan.make(self, hook, batch_size, shuffle=shuffle, buffer_rows=buffer_rows, seed=seed,
                              epochs=epochs, rank=rank, world_size=world_size, dtype=dtype, drop_last=drop_last)
        return iterate(self, plan)


def _tensor(arr: np.ndarray, dtype: str) -> torch.Tensor:
    import torch

    t = torch.from_numpy(arr)
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


def _reload_prompts(info: dict[str, Any]) -> tuple[PromptSet | None, str | None]:
    from misfeat.data import load_prompts
    from misfeat.errors import MisfeatError

    spec = info.get("spec")
    if not spec:
        return None, ("the store was made from an in-memory prompt set (no spec recorded); pass "
                      "prompts= to open_store")
    try:
        pset = load_prompts(spec)
    except (MisfeatError, OSError) as err:
        return None, f"cannot reload prompt set {spec}: {err}"
    if pset.hash != info.get("hash"):
        return None, (f"prompt set {spec} has changed since caching (hash {pset.hash}, store "
                      f"{info.get('hash')}); pass the original set as prompts= to open_store")
    return pset, None
