"""The batched forward of the cache: planned rows in, activation rows out.

Where it sits: plan (which rows, which batches) -> **producer** -> store (disk) or the SAE
trainer (live, :func:`iter_activations`).

:func:`make_batches` pads a shard's length-bucketed prompts (padding only inside a batch);
:class:`Capture` runs the forward with a tiny hook that gathers the selected positions on
the device and stops the forward once every hook has fired (``stop_at_layer``, then an
exception inside the last block); :func:`fill_shard` scatters the rows to their
prompt-order place in a preallocated shard buffer (no ``torch.cat``, no sort).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from misfeat.activations.plan import (
    Encodings,
    RowPlan,
    Tokenizing,
    buckets,
    check_rows_possible,
    encode_prompts,
    plan_rows,
)
from misfeat.data import pad_id_of
from misfeat.errors import MisfeatError
from misfeat.hooks import check_hooks, last_layer_of, position_masks

if TYPE_CHECKING:
    import numpy as np
    import torch
    from transformer_lens import HookedTransformer

    from misfeat.data import TokenBatch

_NOT_PER_TOKEN = ("hook_pattern", "hook_attn_scores")


def default_batch_tokens(device_type: str) -> int:
    """Tokens per forward batch: small on CPU (the attention scores stay in cache), large on GPU."""
    return 2048 if device_type == "cpu" else 65536


# --- the forward ---------------------------------------------------------------------


class _AllCaptured(Exception):
    """Raised by the last capture hook: the rest of the forward is not needed."""


def hook_widths(model: HookedTransformer, hooks: Sequence[str]) -> dict[str, int]:
    """``{hook: d}`` (per-token width, heads flattened); refuses hooks that are not per token."""
    import torch

    hooks = check_hooks(model, hooks)
    bad = [h for h in hooks if h.endswith(_NOT_PER_TOKEN)]
    shapes: dict[str, tuple[int, ...]] = {}

    def probe(act, hook):
        shapes[hook.name] = tuple(act.shape)

    batch, seq = 2, min(5, model.cfg.n_ctx)
    device = next(model.parameters()).device
    with torch.no_grad(), model.hooks(fwd_hooks=[(h, probe) for h in hooks]):
        model(torch.zeros((batch, seq), dtype=torch.long, device=device), return_type=None)
    bad += [h for h in hooks if h not in bad and shapes.get(h, ())[:2] != (batch, seq)]
    if bad:
        raise MisfeatError(
            f"hook(s) {', '.join(bad)} do not have one activation per token (shape [batch, pos, ...]); "
            "cache per-token hooks such as blocks.L.hook_resid_post, blocks.L.attn.hook_z or "
            "blocks.L.hook_mlp_out"
        )
    return {h: int(torch.Size(shapes[h][2:]).numel()) for h in hooks}


class Capture:
    """Runs the forward once per batch and returns ``{hook: [rows, d]}`` for the selected positions.

    Hooks are added for one forward at a time (and removed even on error), so code that
    uses the model between batches never meets them, unless a loop that runs nothing else
    keeps them on with :meth:`installed`. The forward stops at ``stop_at_layer`` and,
    inside the last block, as soon as every hook has fired. Hooks the user added before
    (a steering vector, say) run first: the cache sees the steered activations, and the
    position masks are declared (:func:`misfeat.hooks.position_masks`) for them.
    """

    def __init__(self, model: HookedTransformer, hooks: Sequence[str], *, autocast: bool = False):
        self.model, self.hooks = model, list(hooks)
        self.stop = last_layer_of(self.hooks, model.cfg.n_layers)
        self.autocast = autocast
        self._src: torch.Tensor | None = None
        self._into: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None  # (scatter, buffers)
        self._out: dict[str, torch.Tensor] = {}
        self._fwd = [(h, self._capture) for h in self.hooks]
        self._installed = False

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Keep the hooks on for several batches (adding and removing them costs ~1 ms a
        forward); only for loops that run no other code on the model in between."""
        with self.model.hooks(fwd_hooks=self._fwd):
            self._installed = True
            try:
                yield
            finally:
                self._installed = False

    def _capture(self, act: torch.Tensor, hook) -> None:
        flat = act.reshape(act.shape[0] * act.shape[1], -1)
        if self._into is not None:  # straight into the shard buffer: one copy, no gathered rows
            scatter, buffers = self._into
            buf = buffers[hook.name]
            copy_rows(buf, scatter[hook.name] if isinstance(scatter, dict) else scatter, flat)
            self._out[hook.name] = buf
        else:
            self._out[hook.name] = flat.index_select(0, self._src)
        if len(self._out) == len(self.hooks):
            raise _AllCaptured

    def forward(self, tokens: torch.Tensor) -> None:
        """The model's forward to the last hook (the hooks raise once all have fired)."""
        kwargs = {"padding_side": "right"} if self.model.tokenizer is not None else {}
        self.model(tokens, return_type=None, stop_at_layer=self.stop, **kwargs)

    def run_into(self, tokens: torch.Tensor, scatter: torch.Tensor | dict[str, torch.Tensor],
                 buffers: dict[str, torch.Tensor], masks: dict[str, torch.Tensor] | None = None) -> None:
        """Copy every position's activation straight to row ``scatter[b * seq + t]`` of
        ``buffers[hook]`` (padding to a spare row; ``scatter``: one for all hooks, or one
        per hook), on the model's device."""
        self._into = (scatter, buffers)
        try:
            self.run(tokens, scatter, masks)
        finally:
            self._into = None

    def run(self, tokens: torch.Tensor, src: torch.Tensor,
            masks: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """``src``: flat indices (``b * seq + t``) of the positions to keep, on the model's device."""
        import torch

        self._src, self._out = src, {}
        amp = (torch.autocast(device_type=tokens.device.type, dtype=torch.bfloat16) if self.autocast
               else contextlib.nullcontext())
        declared = position_masks(masks) if masks is not None else contextlib.nullcontext()
        hooked = contextlib.nullcontext() if self._installed else self.model.hooks(fwd_hooks=self._fwd)
        try:
            with hooked, declared, amp:
                self.forward(tokens)
        except _AllCaptured:
            pass
        finally:
            self._src = None
        if len(self._out) != len(self.hooks):
            missing = [h for h in self.hooks if h not in self._out]
            raise MisfeatError(f"hook(s) {', '.join(missing)} never fired in the forward pass of this model")
        out, self._out = self._out, {}
        return out


@dataclass(frozen=True)
class Batch:
    """One forward batch: tokens, the flat positions to keep, and which rows they fill."""

    tokens: torch.Tensor  # long [b, seq], right-padded
    src: torch.Tensor  # long [rows]: b * seq + t of each kept position, row-major
    dest: torch.Tensor  # long [rows]: row of each kept position in the range's row plan
    masks: dict[str, torch.Tensor]
    n_tokens: int  # real (unpadded) tokens
    # long [b * seq]: the row of every position, padding and unkept ones to the spare row
    # (``spare``: the range's row count); None when most positions are not kept (then gather, scatter)
    scatter: torch.Tensor | None = None
    spare: int = 0

    def pinned(self) -> Batch:
        """The same batch in page-locked memory (for non-blocking copies to a GPU)."""
        return Batch(self.tokens.pin_memory(), self.src.pin_memory(), self.dest.pin_memory(),
                     {k: v.pin_memory() for k, v in self.masks.items()}, self.n_tokens,
                     None if self.scatter is None else self.scatter.pin_memory(), self.spare)


def copy_rows(buf: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> None:
    """``buf[index[i]] = rows[i]`` (``buf.index_copy_(0, index, rows)``, cast to ``buf``'s dtype).

    On the CPU each row is moved as one numpy item of the row's byte size (a ``memcpy`` per
    row, 12 GB/s here), not element by element as ``index_copy_`` does (4.6 GB/s at d 768 in
    bfloat16): this copy is most of the forward thread's own work in a host-bound run.
    """
    import numpy as np
    import torch

    rows = rows.to(buf.dtype)
    if buf.device.type != "cpu" or rows.device.type != "cpu" or index.device.type != "cpu" or buf.dim() != 2 \
            or not buf.is_contiguous():
        buf.index_copy_(0, index, rows)
        return
    row = np.dtype((np.void, buf.shape[1] * buf.element_size()))
    target = buf.view(torch.uint8).numpy().view(row).reshape(-1)  # a view: buf is a contiguous row block
    source = rows.contiguous().reshape(len(index), -1).view(torch.uint8).numpy().view(row).reshape(-1)
    target[index.numpy()] = source


def pad_right(enc: Encodings, prompts: np.ndarray, lengths: np.ndarray, pad_id: int) -> TokenBatch:
    """:func:`misfeat.data.collate` (right padding) of local prompts ``prompts`` of ``enc``, each
    cut to its ``lengths``, with numpy gathers instead of a Python loop over prompts and
    tokens (tested equal to ``collate``)."""
    import numpy as np
    import torch

    from misfeat.data import TokenBatch

    n, width = len(prompts), int(lengths.max())
    n_prompt = np.minimum(enc.n_prompt[prompts], lengths)
    col = np.arange(width)[None, :]
    attention = col < lengths[:, None]
    tokens = np.full((n, width), pad_id, dtype=np.int64)
    # the tokens of row i are enc.tokens[offsets[p_i] : offsets[p_i] + lengths[i]]
    tokens[attention] = enc.tokens[(enc.offsets[prompts][:, None] + col)[attention]]
    prompt = col < n_prompt[:, None]
    return TokenBatch(torch.from_numpy(tokens), torch.from_numpy(attention), torch.from_numpy(prompt),
                      torch.from_numpy(attention & ~prompt), torch.from_numpy(col == n_prompt[:, None] - 1),
                      "right")


def make_batches(enc: Encodings, rows: RowPlan, *, pad_id: int, batch_tokens: int) -> Iterator[Batch]:
    """Length-bucketed batches (longest first) over the prompts of ``enc`` that have rows."""
    import numpy as np
    import torch

    prompts = np.flatnonzero(rows.forward_len > 0)
    lengths = rows.forward_len[prompts]
    for group in buckets(lengths.tolist(), batch_tokens):
        ps = prompts[group]
        batch = pad_right(enc, ps, rows.forward_len[ps], pad_id)
        mask = batch.positions(rows.positions)  # THE definition of the positions (misfeat.data)
        src = mask.reshape(-1).nonzero().squeeze(1)
        counts = rows.hi[ps] - rows.lo[ps]
        if src.numel() != int(counts.sum()):
            raise RuntimeError(f"positions={rows.positions!r}: collate selected {src.numel()} positions, "
                               f"the row plan {int(counts.sum())}")
        dest = np.arange(len(src), dtype=np.int64) + np.repeat(rows.start[ps] - (np.cumsum(counts) - counts),
                                                               counts)
        masks = batch.masks()
        scatter = None
        if 2 * len(src) >= batch.tokens.numel():  # mostly kept: copying padding to a spare row is cheaper
            scatter = torch.full((batch.tokens.numel(),), rows.n_rows, dtype=torch.long)
            scatter[src] = torch.from_numpy(dest)
        yield Batch(batch.tokens, src, torch.from_numpy(dest), masks, int(lengths[group].sum()), scatter,
                    rows.n_rows)


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        return t
    return (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)


def run_batch(capture: Capture, batch: Batch, device: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``({hook: [rows, d]}, dest on device)`` for one batch."""
    masks = {k: _to(v, device) for k, v in batch.masks.items()}
    out = capture.run(_to(batch.tokens, device), _to(batch.src, device), masks)
    return out, _to(batch.dest, device)


def fill_shard(capture: Capture, batches: Iterable[Batch], buffers: dict[str, torch.Tensor], *,
               spares: dict[str, int] | None = None, on_batch: Callable[[int], None] | None = None) -> None:
    """Run ``batches`` into ``buffers`` (``{hook: [> rows, d]}`` on the model's device, in
    the store dtype; each row lands at its ``dest``; row ``spares[hook]``, by default the row
    after the range's rows, takes the padding of batches that copy every position)."""
    device = next(iter(buffers.values())).device
    import torch

    with torch.inference_mode(), capture.installed():
        for batch in batches:
            masks = {k: _to(v, device) for k, v in batch.masks.items()}
            if batch.scatter is not None:
                scatter = _to(batch.scatter, device)
                if spares is not None:  # each hook's padding to its own spare row
                    padding = scatter == batch.spare
                    scatter = {h: scatter.masked_fill(padding, spares[h]) for h in buffers}
                capture.run_into(_to(batch.tokens, device), scatter, buffers, masks)
            else:
                out = capture.run(_to(batch.tokens, device), _to(batch.src, device), masks)
                dest = _to(batch.dest, device)
                for hook, buf in buffers.items():
                    copy_rows(buf, dest, out[hook])
            if on_batch is not None:
                on_batch(batch.n_tokens)


def iter_activations(model: HookedTransformer, prompts, hook: str, positions: str = "all", *,
                     batch_tokens: int | None = None, dtype: str | torch.dtype | None = None,
                     chat_format: str = "auto") -> Iterator[torch.Tensor]:
    """Activation rows of ``hook`` straight from a live model, no disk: ``[rows, d]`` chunks.

    One chunk per forward batch, in length-bucketed order (longest prompts first), rows
    of a prompt in position order. ``prompts``: a prompt-set spec, JSONL path or
    :class:`PromptSet`. The tensors are ordinary (not inference-mode) tensors, so an SAE
    trainer can use them in autograd. ``dtype``: cast to this (default: the model's).
    """
    import torch

    from misfeat.data import load_prompts
    from misfeat.models import resolve_dtype

    prompts = load_prompts(prompts)
    check_rows_possible(prompts, positions)
    hook_widths(model, [hook])
    how = Tokenizing.of(model, prompts, positions, chat_format)
    enc = encode_prompts(prompts.records, model, how)
    rows = plan_rows(enc, positions, causal=how.causal)
    device = next(model.parameters()).device
    capture = Capture(model, [hook])
    out_dtype = resolve_dtype(dtype) if dtype is not None else None
    budget = batch_tokens or default_batch_tokens(device.type)
    for batch in make_batches(enc, rows, pad_id=pad_id_of(model), batch_tokens=budget):
        with torch.no_grad():  # not inference_mode: its tensors cannot be saved for backward
            out, _ = run_batch(capture, batch, device)
        chunk = out[hook]
        yield chunk if out_dtype is None else chunk.to(out_dtype)
