"""Activation streams for the trainer: exact-size batches, shuffling, repetition.

The seam between data and training is ``Iterator[Tensor]`` of ``[rows, d_in]`` chunks of
any size (a store's ``batches``, ``iter_activations`` from a live model, a test's random
tensors). :func:`rebatch` cuts any such stream into the exact batches the trainer counts
(so a resume can skip the batches a run already consumed); :func:`shuffled` mixes a
stream that arrives in prompt order (a live model) through a buffer; :func:`repeat`
restarts a finite stream until the trainer has enough tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch

from misfeat.errors import MisfeatError


def _check(chunk: object, d_in: int | None) -> torch.Tensor:
    if not isinstance(chunk, torch.Tensor) or chunk.ndim != 2:
        shape = tuple(chunk.shape) if isinstance(chunk, torch.Tensor) else type(chunk).__name__
        raise MisfeatError(f"an activation batch must be a 2-D [rows, d_in] tensor, got {shape}; flatten the "
                           "token dimensions first (acts.reshape(-1, d_in))")
    if d_in is not None and chunk.shape[1] != d_in:
        raise MisfeatError(f"activation width changed from {d_in} to {chunk.shape[1]} within one stream; "
                           "a stream must come from one hook")
    return chunk


def rebatch(chunks: Iterable[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    """Cut a stream of ``[rows, d]`` chunks into ``[batch_size, d]`` batches, in order.

    Chunks of exactly ``batch_size`` rows pass through without a copy. A final partial
    batch is dropped (the trainer's step count is ``total_tokens // batch_size``).
    """
    pending: list[torch.Tensor] = []
    have = 0
    d_in = None
    for chunk in chunks:
        chunk = _check(chunk, d_in)
        d_in = chunk.shape[1]
        if not pending and chunk.shape[0] == batch_size:
            yield chunk
            continue
        pending.append(chunk)
        have += chunk.shape[0]
        while have >= batch_size:
            joined = torch.cat(pending) if len(pending) > 1 else pending[0]
            yield joined[:batch_size]
            rest = joined[batch_size:]
            pending = [rest] if rest.shape[0] else []
            have = rest.shape[0]


def shuffled(chunks: Iterable[torch.Tensor], buffer_rows: int = 262_144, seed: int = 0,
             out_rows: int = 4096) -> Iterator[torch.Tensor]:
    """Mix a stream through a buffer of ``buffer_rows`` rows; yields ``[out_rows, d]`` chunks.

    Rows from one prompt arrive together from a live model; an SAE trains better when a
    batch mixes many prompts. The buffer is filled, its rows permuted, and the first
    half emitted, as in sae-lens's mixing buffer. Deterministic for a given ``seed``.
    """
    gen = torch.Generator().manual_seed(seed)
    buffer: list[torch.Tensor] = []
    have = 0

    def drain(rows: torch.Tensor, keep: int) -> tuple[list[torch.Tensor], Iterator[torch.Tensor]]:
        rows = rows[torch.randperm(rows.shape[0], generator=gen).to(rows.device)]
        out = rows[keep:]
        return ([rows[:keep]] if keep else []), (out[i:i + out_rows] for i in range(0, out.shape[0], out_rows))

    for chunk in chunks:
        buffer.append(_check(chunk, buffer[0].shape[1] if buffer else None))
        have += chunk.shape[0]
        if have >= buffer_rows:
            buffer, out = drain(torch.cat(buffer), buffer_rows // 2)
            have = buffer[0].shape[0] if buffer else 0
            yield from out
    if buffer:
        _, out = drain(torch.cat(buffer), 0)
        yield from out


def repeat(make_stream: Callable[[], Iterable[torch.Tensor]], max_passes: int | None = None) -> Iterator[torch.Tensor]:
    """Chain fresh passes of ``make_stream()`` (e.g. over a prompt set) until the consumer stops."""
    passes = 0
    while max_passes is None or passes < max_passes:
        empty = True
        for chunk in make_stream():
            empty = False
            yield chunk
        if empty:
            raise MisfeatError("the activation stream is empty; check the prompts and positions it is built from")
        passes += 1
