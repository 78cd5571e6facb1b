"""Tokenise ahead of the forward and build each shard's batches, on a background thread.

Where it sits: prompts -> **feeder** -> producer's forward (main thread) -> writer thread.

Tokenising a large prompt set and padding its batches is CPU work the forward would
otherwise wait for: here it overlaps with the forward (the tokenizer and most torch ops
release the GIL), and with the set-up before it (fingerprint, prompt hash, resume
checks). All tokenisation of a run happens on this one thread, so the tokenizer is never
used from two threads at once. Its jobs, in order of priority:

1. the fixed sample that sizes the shards (:attr:`mean_rows`);
2. the next ``depth`` shards' batches, once :meth:`set_shards` has said which;
3. in between, the rest of the set in order, so a malformed or over-long record deep in
   the set stops the run within seconds rather than at its shard.

When the tokenised-prompt cache (``tokens.py``) holds the set, nothing is tokenised: the
arrays are loaded at once; otherwise the whole set's tokens are saved there once encoded.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from misfeat.activations import tokens as token_cache
from misfeat.activations.plan import (
    Encodings,
    ShardSpec,
    Tokenizing,
    encode_prompts,
    plan_rows,
    row_ranges,
    sample_indices,
)
from misfeat.activations.producer import Batch, make_batches

if TYPE_CHECKING:
    import numpy as np
    from transformer_lens import HookedTransformer

    from misfeat.data import PromptSet


_DONE = object()


class BatchStream:
    """A shard's batches, handed over one by one as the feeder builds them, so the forward
    starts on the first batch of a shard rather than after the last is padded."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()

    def put(self, item: Batch | BaseException | object) -> None:
        self._queue.put(item)

    def __iter__(self) -> Iterator[Batch]:
        while (item := self._queue.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item


@dataclass(frozen=True)
class ShardWork:
    """Everything the forward needs for one shard."""

    spec: ShardSpec
    rows: int
    tokens: int  # real tokens to forward
    batches: BatchStream
    meta: dict[str, np.ndarray]  # prompt_index, position, token_id per row


class Feeder:
    """Start it first; read :attr:`mean_rows`, then :meth:`set_shards`, then iterate over
    :class:`ShardWork` in order. Errors of the thread are raised in the consumer."""

    def __init__(self, prompts: PromptSet, model: HookedTransformer, how: Tokenizing, positions: str, *,
                 pad_id: int, batch_tokens: int, chunk: int = 256, depth: int = 2, token_key: str | None = None,
                 pin: bool = False):
        """``token_key``: the set's name in the tokenised-prompt cache (None: do not use it);
        ``pin``: page-lock the batches' tensors here (CUDA), off the forward's thread."""
        import numpy as np

        self.prompts, self.model, self.how, self.positions = prompts, model, how, positions
        self.pad_id, self.batch_tokens, self.chunk = pad_id, batch_tokens, chunk
        self.token_key, self.pin = token_key, pin
        self.error: BaseException | None = None
        self.total_tokens: int | None = None  # tokens to forward for the shards, once all is tokenised
        self._mean_rows: float | None = None
        self._todo: list[ShardSpec] | None = None
        self._chunks: list[Encodings] = []
        self._encoded = 0
        self._forward_len = np.zeros(len(prompts), dtype=np.int64)
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stream: BatchStream | None = None
        self._stop = threading.Event()
        self._sampled = threading.Event()
        self._shards_set = threading.Event()
        self._thread = threading.Thread(target=self._run, name="misfeat-feeder", daemon=True)
        self._thread.start()

    @property
    def mean_rows(self) -> float:
        """Mean rows per prompt over the fixed sample (waits for it)."""
        while not self._sampled.wait(0.05):
            self.check()
        self.check()
        return self._mean_rows

    def set_shards(self, todo: list[ShardSpec]) -> None:
        self._todo = list(todo)
        self._shards_set.set()

    def __iter__(self) -> Iterator[ShardWork]:
        while (item := self._queue.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item

    def check(self) -> None:
        """Raise the thread's error now (called between batches: fail fast)."""
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join()

    # --- the thread ------------------------------------------------------------------

    def _run(self) -> None:
        next_chunk, i = 0, 0
        try:
            if self.pin:  # pinned memory belongs to the current device's context: this rank's GPU, not GPU 0
                import torch

                torch.cuda.set_device(next(self.model.parameters()).device)
            cached = token_cache.load(self.token_key, len(self.prompts)) if self.token_key else None
            if cached is not None:
                self.chunk = max(1, len(self.prompts))  # one chunk: the whole set
                self._sample(cached)
                self._add_chunk(cached)
                next_chunk = 1
            else:
                self._sample()
            n_chunks = -(-len(self.prompts) // self.chunk)
            while not self._stop.is_set():
                todo = self._todo
                ready = todo is not None and i < len(todo) and self._encoded >= todo[i].end_prompt
                if ready and not self._queue.full():
                    self._feed(todo[i])
                    i += 1
                elif next_chunk < n_chunks:
                    self._encode_chunk(next_chunk)
                    next_chunk += 1
                elif todo is None:
                    self._shards_set.wait(0.05)
                elif i < len(todo):
                    self._feed(todo[i])
                    i += 1
                else:
                    self._put(_DONE)
                    return
        except BaseException as err:  # handed to the consumer
            self.error = err
            self._sampled.set()
            if self._stream is not None:
                self._stream.put(err)
            self._put(err)

    def _put(self, item: Any) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return
            except queue.Full:
                continue

    def _sample(self, cached: Encodings | None = None) -> None:
        idx = sample_indices(len(self.prompts))
        if cached is None:
            enc = encode_prompts([self.prompts[i] for i in idx], self.model, self.how)
            lengths, n_prompt = enc.lengths, enc.n_prompt
        else:
            lengths, n_prompt = cached.lengths[idx], cached.n_prompt[idx]
        lo, hi = row_ranges(lengths, n_prompt, self.positions)
        self._mean_rows = float((hi - lo).mean())
        self._sampled.set()

    def _encode_chunk(self, c: int) -> None:
        a = c * self.chunk
        self._add_chunk(encode_prompts(self.prompts.records[a:a + self.chunk], self.model, self.how, first=a))
        if self._encoded == len(self.prompts) and self.token_key:
            token_cache.save(self.token_key, self._range(0, len(self.prompts)))  # for the next run

    def _add_chunk(self, enc: Encodings) -> None:
        a = enc.first
        self._forward_len[a:a + len(enc)] = plan_rows(enc, self.positions, causal=self.how.causal).forward_len
        self._chunks.append(enc)
        self._encoded = a + len(enc)
        if self._encoded == len(self.prompts):
            while self._todo is None and not self._stop.is_set():
                self._shards_set.wait(0.05)
            self.total_tokens = int(sum(int(self._forward_len[s.first_prompt:s.end_prompt].sum())
                                        for s in self._todo or []))

    def _range(self, a: int, b: int) -> Encodings:
        """Prompts ``[a, b)`` (already tokenised) as one :class:`Encodings`."""
        import numpy as np

        tokens, lengths, n_prompt = [], [], []
        for c in range(a // self.chunk, (b - 1) // self.chunk + 1):
            enc = self._chunks[c]
            i, j = max(a, enc.first) - enc.first, min(b, enc.first + len(enc)) - enc.first
            tokens.append(enc.tokens[enc.offsets[i]:enc.offsets[j]])
            lengths.append(enc.lengths[i:j])
            n_prompt.append(enc.n_prompt[i:j])
        lengths_all = np.concatenate(lengths)
        offsets = np.zeros(len(lengths_all) + 1, dtype=np.int64)
        np.cumsum(lengths_all, out=offsets[1:])
        return Encodings(a, np.concatenate(tokens), offsets, np.concatenate(n_prompt))

    def _feed(self, spec: ShardSpec) -> None:
        """Hand over shard ``spec``, then its batches one by one."""
        enc = self._range(spec.first_prompt, spec.end_prompt)
        rows = plan_rows(enc, self.positions, causal=self.how.causal)
        self._stream = BatchStream()
        self._put(ShardWork(spec, rows.n_rows, int(rows.forward_len.sum()), self._stream, rows.meta(enc)))
        for batch in make_batches(enc, rows, pad_id=self.pad_id, batch_tokens=self.batch_tokens):
            if self._stop.is_set():
                return
            self._stream.put(batch.pinned() if self.pin else batch)
        self._stream.put(_DONE)
        self._stream = None
