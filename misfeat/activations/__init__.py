"""The activation caching core: every SAE, model diff and direction reads from here.

Where it sits in the flow::

    models + data -> activations -> sae -> features -> interventions

- :func:`cache_activations` / :func:`cache_models`: run a model (or several checkpoints)
  over a prompt set and write a sharded, resumable, checksummed store
  (``plan.py`` which rows and shards, ``feeder.py`` tokenising ahead, ``producer.py`` the
  batched forward, ``store.py`` manifest + writer, ``buffers.py`` its host memory, ``shards.py`` the files,
  ``distributed.py`` torchrun, ``tokens.py`` the tokenised-prompt cache, ``cache.py`` the
  entry points); :func:`migrate_store` converts between store versions.
- :func:`open_store` -> :class:`ActivationStore`: memory-mapped rows by index, prompt,
  domain or label, and shuffled ``[batch, d]`` training batches (``reader.py``,
  ``batches.py``).
- :func:`iter_activations`: the same rows straight from a live model, without disk.

The format is described in ``docs/cache-format.md``. Importing this package is cheap
(torch is imported inside the functions).
"""

from misfeat.activations.cache import (
    CacheResult,
    cache_activations,
    cache_models,
    cache_with_config,
)
from misfeat.activations.migrate import migrate_store
from misfeat.activations.producer import iter_activations
from misfeat.activations.reader import ActivationStore, RowMeta, open_store
from misfeat.activations.shards import DiskFullError, ShardRecord, StoreError
from misfeat.activations.store import CacheConfig

__all__ = [
    "ActivationStore",
    "CacheConfig",
    "CacheResult",
    "DiskFullError",
    "RowMeta",
    "ShardRecord",
    "StoreError",
    "cache_activations",
    "cache_models",
    "cache_with_config",
    "iter_activations",
    "migrate_store",
    "open_store",
]
