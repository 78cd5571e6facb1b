"""What becomes a row, and where it goes: tokens, row ranges, shards and batches' buckets.

Where it sits: ``data`` (records, ``encode``, masks) -> **plan** -> producer (forward) -> store.

- :func:`encode_prompts` tokenises records with :func:`misfeat.data.encode` into flat
  ``int32`` arrays (4 bytes a token, not a Python tuple per prompt).
- :func:`plan_rows`: under right padding every positions mode of
  :meth:`misfeat.data.TokenBatch.positions` selects one contiguous range ``[lo, hi)`` of
  each prompt, so each row's place is known before the forward and rows are laid out in
  prompt order. A causal model only needs a prompt's first ``hi`` tokens:
  ``positions='prompt'|'last'`` skip the response tokens.
- :func:`plan_shards` cuts the prompt set into ranges of equal prompt counts, sized from a
  fixed sample so that a shard holds about ``shard_mb``: it needs no full tokenisation, so
  the forward can start while the rest of the set is tokenised (``feeder.py``).
- :func:`buckets` groups a shard's prompts by length for batching.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from misfeat.data import (
    CHAT_FORMATS,
    Encoded,
    PromptRecord,
    PromptSet,
    batch_by_tokens,
    chat_format_of,
    encode,
)
from misfeat.errors import MisfeatError

if TYPE_CHECKING:
    import numpy as np
    from transformer_lens import HookedTransformer

META_BYTES = 16  # prompt_index int64 + position int32 + token_id int32 per row
_SAMPLE = 256  # prompts tokenised up front to size the shards


# --- tokens --------------------------------------------------------------------------


@dataclass(frozen=True)
class Tokenizing:
    """How records become tokens; equal keys (with equal prompts) mean equal token rows."""

    chat_format: str  # resolved: organism, template or raw
    with_response: bool
    causal: bool

    @classmethod
    def of(cls, model: HookedTransformer, prompts: PromptSet, positions: str, chat_format: str = "auto"):
        if chat_format == "auto" and prompts.meta.get("chat_format") in CHAT_FORMATS:
            chat_format = prompts.meta["chat_format"]  # the set says how it is rendered (e.g. raw documents)
        causal = model.cfg.attention_dir == "causal"
        return cls(chat_format_of(model, chat_format), positions in ("all", "response") or not causal, causal)

    def key(self, model: HookedTransformer) -> str:
        """A hash of everything that decides the token ids: tokenizer, format, BOS policy."""
        tok = model.tokenizer
        backend = getattr(tok, "backend_tokenizer", None)
        vocab = backend.to_str() if backend is not None else json.dumps(tok.get_vocab(), sort_keys=True)
        parts = [type(tok).__name__, vocab, self.chat_format, str(self.with_response),
                 str(model.cfg.default_prepend_bos), str(tok.bos_token_id),
                 str(getattr(tok, "chat_template", None) if self.chat_format == "template" else None)]
        return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Encodings:
    """Prompts ``[first, first + n)`` as flat arrays: prompt ``first + i`` is ``tokens[offsets[i]:offsets[i+1]]``."""

    first: int
    tokens: np.ndarray  # int32 [n_tokens]
    offsets: np.ndarray  # int64 [n + 1]
    n_prompt: np.ndarray  # int64 [n], BOS included

    def __len__(self) -> int:
        return len(self.n_prompt)

    @property
    def lengths(self) -> np.ndarray:
        return self.offsets[1:] - self.offsets[:-1]

    def encoded(self, i: int, length: int) -> Encoded:
        """Local prompt ``i`` cut to its first ``length`` tokens, as :func:`misfeat.data.collate` takes it."""
        a = int(self.offsets[i])
        return Encoded(tuple(self.tokens[a:a + length].tolist()), min(int(self.n_prompt[i]), length))


def encode_prompts(records: Sequence[PromptRecord], model: HookedTransformer, how: Tokenizing, *,
                   first: int = 0) -> Encodings:
    """Tokenise ``records`` (prompts ``first, first+1, ...`` of their set) into flat arrays."""
    import numpy as np

    encoded = encode(records, model, fmt=how.chat_format, with_response=how.with_response)
    lengths = np.fromiter((len(e.ids) for e in encoded), dtype=np.int64, count=len(encoded))
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.fromiter((t for e in encoded for t in e.ids), dtype=np.int32, count=int(offsets[-1]))
    return Encodings(first, tokens, offsets, np.fromiter((e.n_prompt for e in encoded), dtype=np.int64,
                                                         count=len(encoded)))


# --- which rows ----------------------------------------------------------------------


def row_ranges(lengths: np.ndarray, n_prompt: np.ndarray, positions: str) -> tuple[np.ndarray, np.ndarray]:
    """``(lo, hi)``: the stored positions of each prompt (what ``TokenBatch.positions`` selects)."""
    import numpy as np

    if positions == "all":
        lo, hi = np.zeros_like(lengths), lengths
    elif positions == "prompt":
        lo, hi = np.zeros_like(lengths), n_prompt
    elif positions == "response":
        lo, hi = n_prompt, lengths
    elif positions == "last":
        lo, hi = n_prompt - 1, n_prompt
    else:
        raise MisfeatError(f"unknown positions {positions!r}; use response, prompt, last or all")
    return lo.astype(np.int64), hi.astype(np.int64)


@dataclass(frozen=True)
class RowPlan:
    """Per prompt of ``enc``: stored positions ``[lo, hi)``, first row ``start`` (local to
    the range), and how many tokens to run (``forward_len``; 0 for prompts without rows)."""

    positions: str
    lo: np.ndarray
    hi: np.ndarray
    start: np.ndarray  # [n + 1]
    forward_len: np.ndarray

    @property
    def n_rows(self) -> int:
        return int(self.start[-1])

    def meta(self, enc: Encodings) -> dict[str, np.ndarray]:
        """``prompt_index`` (global), ``position``, ``token_id`` of every row, in row order."""
        import numpy as np

        counts = self.hi - self.lo
        local = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
        within = np.arange(self.n_rows, dtype=np.int64) - np.repeat(self.start[:-1], counts)
        position = self.lo[local] + within
        return {"prompt_index": local + enc.first, "position": position.astype(np.int32),
                "token_id": enc.tokens[enc.offsets[local] + position].astype(np.int32)}


def plan_rows(enc: Encodings, positions: str, *, causal: bool = True) -> RowPlan:
    import numpy as np

    lo, hi = row_ranges(enc.lengths, enc.n_prompt, positions)
    start = np.zeros(len(lo) + 1, dtype=np.int64)
    np.cumsum(hi - lo, out=start[1:])
    # a causal model's activation at position t depends on tokens <= t only
    forward_len = np.where(hi > lo, hi if causal else enc.lengths, 0).astype(np.int64)
    return RowPlan(positions, lo, hi, start, forward_len)


@dataclass(frozen=True)
class ShardSpec:
    """Shard ``index`` holds the rows of prompts ``[first_prompt, end_prompt)``."""

    index: int
    first_prompt: int
    end_prompt: int


def sample_indices(n: int) -> list[int]:
    """The fixed, evenly spaced sample of prompts that sizes the shards."""
    import numpy as np

    return sorted({int(i) for i in np.linspace(0, n - 1, min(n, _SAMPLE))})


def prompts_per_shard(n_prompts: int, mean_rows: float, row_bytes: int, shard_bytes: int) -> int:
    """Prompts a shard takes to hold about ``shard_bytes`` at ``mean_rows`` rows a prompt."""
    return int(min(n_prompts, max(1, round(shard_bytes / (row_bytes * max(mean_rows, 1e-3))))))


def plan_shards(n_prompts: int, per_shard: int) -> list[ShardSpec]:
    """Contiguous prompt ranges of ``per_shard`` prompts (the last may be shorter)."""
    return [ShardSpec(i, a, min(a + per_shard, n_prompts)) for i, a in enumerate(range(0, n_prompts, per_shard))]


def buckets(lengths: Sequence[int], batch_tokens: int, *, slack: float = 0.15,
            min_fill: float = 0.25) -> list[list[int]]:
    """:func:`misfeat.data.batch_by_tokens` (sorted, at most ``batch_tokens`` padded tokens a
    batch), with each batch cut again where a prompt is more than ``slack`` shorter than the
    batch's longest, once the batch holds ``min_fill`` of the budget. On a few hundred
    prompts of mixed lengths a full-budget batch spans a wide range of lengths: this cuts
    the padding from ~40% to ~10% at the cost of a few more, still large, batches."""
    out = []
    for group in batch_by_tokens(list(lengths), batch_tokens):
        current, longest = [group[0]], lengths[group[0]]
        for i in group[1:]:
            if lengths[i] < (1 - slack) * longest and len(current) * longest >= min_fill * batch_tokens:
                out.append(current)
                current, longest = [], lengths[i]
            current.append(i)
        out.append(current)
    return out


def check_rows_possible(prompts: PromptSet, positions: str) -> None:
    """Refuse, before any work, a prompt set that cannot give a single row."""
    if len(prompts) == 0:
        raise MisfeatError("the prompt set is empty; give a prompt set with at least one record")
    if positions == "response" and not prompts.any_response:
        raise MisfeatError("positions='response' selects no token: no record of the prompt set has a "
                           "'response'; use positions='prompt', 'last' or 'all', or a prompt set with responses")
