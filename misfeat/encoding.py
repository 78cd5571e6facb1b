"""Chat rendering and tokenisation with position masks.

Tokenisation renders each record with a chat format, prepends BOS where the model
expects it, and returns padded batches with boolean masks over the prompt tokens, the
response tokens and the last prompt token (the position that predicts the response).
This is the single place that knows what ``positions='prompt'|'response'|'last'|'all'``
means; the cache, the evaluation and the interventions all read these masks
(:meth:`TokenBatch.masks`). The records themselves are :mod:`misfeat.data`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from misfeat.errors import PromptFileError

if TYPE_CHECKING:
    import torch
    from transformer_lens import HookedTransformer

    from misfeat.data import PromptRecord, PromptSet

POSITIONS = ("all", "prompt", "response", "last")
CHAT_FORMATS = ("auto", "organism", "template", "raw")


# --- chat rendering ------------------------------------------------------------------


def chat_format_of(model: HookedTransformer, fmt: str = "auto") -> str:
    """Resolve ``auto``: the checkpoint's own format, else the tokenizer's chat template, else raw."""
    if fmt not in CHAT_FORMATS:
        raise ValueError(f"unknown chat format {fmt!r}; use one of {', '.join(CHAT_FORMATS)}")
    if fmt != "auto":
        return fmt
    from misfeat.models import model_info

    saved = model_info(model).meta.get("chat_format")
    if saved in CHAT_FORMATS and saved != "auto":
        return saved
    if model.tokenizer is not None and getattr(model.tokenizer, "chat_template", None):
        return "template"
    return "raw"


def _turns(record: PromptRecord) -> tuple[tuple[str, str], ...]:
    return record.messages if record.messages is not None else (("user", record.prompt or ""),)


def render(record: PromptRecord, fmt: str, tokenizer: Any = None) -> tuple[str, str | None]:
    """``(prompt_text, response_text)`` of a record in chat format ``fmt`` (resolved).

    organism: ``user <q> assistant : <a> . user <q> assistant :``; the response ends in
    `` .``, the organism's end of turn. template: the tokenizer's chat template with a
    generation prompt. raw: the prompt as written (turns joined by newlines).
    """
    turns = _turns(record)
    response = record.response
    if fmt == "organism":
        parts = []
        for role, content in turns:
            if role == "assistant":
                parts.append(f"assistant : {content} .")
            else:  # the organism has no system role: a system turn reads as user text
                parts.append(f"user {content}")
        parts.append("assistant :")
        return " ".join(parts), (None if response is None else f" {response} .")
    if fmt == "template":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("chat format 'template' needs a tokenizer with a chat_template")
        msgs = [{"role": r, "content": c} for r, c in turns]
        from misfeat.chat import apply_template, template_response

        where = record.source or f"record {record.id!r}"
        text = apply_template(tokenizer, msgs, where, add_generation_prompt=True)
        if response is not None:
            response = template_response(tokenizer, msgs, where, text, response)
        return text, response
    if fmt == "raw":
        text = "\n".join(c for _, c in turns)
        if response is not None and response and not response[0].isspace():
            response = " " + response
        return text, response
    raise ValueError(f"unresolved chat format {fmt!r}")


# --- tokenisation --------------------------------------------------------------------


@dataclass(frozen=True)
class Encoded:
    """One tokenised record: ``ids`` = [BOS] + prompt + response; ``n_prompt`` counts BOS too."""

    ids: tuple[int, ...]
    n_prompt: int

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class TokenBatch:
    """A padded batch. All masks are ``[batch, seq]`` bool; ``tokens`` is ``[batch, seq]`` long.

    ``last_mask`` marks the last prompt token: the position whose output predicts the
    first response token (the organism's ``:`` after ``assistant``).
    """

    tokens: torch.Tensor
    attention_mask: torch.Tensor
    prompt_mask: torch.Tensor
    response_mask: torch.Tensor
    last_mask: torch.Tensor
    padding_side: str

    def positions(self, mode: str) -> torch.Tensor:
        """The ``[batch, seq]`` mask of positions for ``mode`` (``all``, ``prompt``, ``response``, ``last``)."""
        if mode == "all":
            return self.attention_mask
        if mode == "prompt":
            return self.prompt_mask
        if mode == "response":
            return self.response_mask
        if mode == "last":
            return self.last_mask
        raise ValueError(f"unknown positions {mode!r}; use one of {', '.join(POSITIONS)}")

    def masks(self) -> dict[str, torch.Tensor]:
        """Every position mask by name (``all``, ``prompt``, ``response``, ``last``): what
        :func:`misfeat.hooks.position_masks` and ``apply(..., masks=)`` take."""
        return {mode: self.positions(mode) for mode in POSITIONS}

    def to(self, device: Any) -> TokenBatch:
        return TokenBatch(*(t.to(device) for t in (self.tokens, self.attention_mask, self.prompt_mask,
                                                   self.response_mask, self.last_mask)), self.padding_side)


def encode(
    prompts: PromptSet | Sequence[PromptRecord],
    model: HookedTransformer,
    *,
    fmt: str = "auto",
    with_response: bool = True,
    max_len: int | None = None,
) -> list[Encoded]:
    """Tokenise each record (prompt, then response when present and ``with_response``).

    Raises :class:`PromptFileError` naming the record's file and line when a record is
    longer than ``max_len`` (default: the model's context).
    """
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise ValueError("the model has no tokenizer; load it with misfeat.models.load_model or set_tokenizer")
    meta = getattr(prompts, "meta", None)  # a PromptSet says how it must be rendered (e.g. raw documents)
    if fmt == "auto" and isinstance(meta, dict) and meta.get("chat_format") in CHAT_FORMATS:
        fmt = meta["chat_format"]
    fmt = chat_format_of(model, fmt)
    limit = max_len or model.cfg.n_ctx
    bos = tokenizer.bos_token_id if model.cfg.default_prepend_bos else None
    records = list(prompts)
    rendered = [render(record, fmt, tokenizer) for record in records]
    # one tokenizer call per list, not per record: the per-call overhead of transformers
    # costs more than the tokenisation itself for short prompts (the ids are the same)
    prompt_ids = _token_ids(tokenizer, [p for p, _ in rendered])
    wanted = [i for i, (_, r) in enumerate(rendered) if with_response and r]
    response_ids = dict(zip(wanted, _token_ids(tokenizer, [rendered[i][1] for i in wanted]), strict=True))
    out = []
    for i, record in enumerate(records):
        ids = prompt_ids[i]
        if bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        n_prompt = len(ids)
        if i in response_ids:
            ids = ids + response_ids[i]
        if n_prompt == 0:
            raise PromptFileError(f"{record.source or record.id}: the prompt tokenises to nothing")
        if len(ids) > limit:
            raise PromptFileError(
                f"{record.source or 'record ' + repr(record.id)}: {len(ids)} tokens, longer than the "
                f"model's context of {limit}; shorten it or drop the record"
            )
        out.append(Encoded(tuple(ids), n_prompt))
    return out


def _token_ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def collate(encoded: Sequence[Encoded], pad_id: int, padding_side: str = "right",
            device: Any = None) -> TokenBatch:
    """Pad a list of :class:`Encoded` to the longest and build the position masks."""
    import torch

    if padding_side not in ("left", "right"):
        raise ValueError("padding_side must be 'left' or 'right'")
    n, width = len(encoded), max(len(e) for e in encoded)
    tokens = torch.full((n, width), pad_id, dtype=torch.long)
    lengths = torch.tensor([len(e) for e in encoded])
    n_prompt = torch.tensor([e.n_prompt for e in encoded])
    for i, e in enumerate(encoded):
        start = width - len(e) if padding_side == "left" else 0
        tokens[i, start:start + len(e)] = torch.tensor(e.ids, dtype=torch.long)
    col = torch.arange(width)[None, :]
    start = (width - lengths if padding_side == "left" else torch.zeros_like(lengths))[:, None]
    attention = (col >= start) & (col < start + lengths[:, None])
    prompt = (col >= start) & (col < start + n_prompt[:, None])
    response = attention & ~prompt
    last = col == (start + n_prompt[:, None] - 1)
    batch = TokenBatch(tokens, attention, prompt, response, last, padding_side)
    return batch.to(device) if device is not None else batch


def pad_id_of(model: HookedTransformer) -> int:
    tok = model.tokenizer
    for candidate in (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def tokenize(
    prompts: PromptSet | Sequence[PromptRecord],
    model: HookedTransformer,
    *,
    fmt: str = "auto",
    with_response: bool = True,
    padding_side: str = "right",
) -> TokenBatch:
    """Render, tokenise and pad ``prompts`` into one :class:`TokenBatch` on the model's device."""
    encoded = encode(prompts, model, fmt=fmt, with_response=with_response)
    return collate(encoded, pad_id_of(model), padding_side, device=model.cfg.device)


def batch_by_tokens(lengths: Sequence[int], max_tokens: int, max_batch: int | None = None,
                    sort: bool = True) -> list[list[int]]:
    """Group indices into batches whose padded size (rows x longest) stays within ``max_tokens``.

    With ``sort`` the indices are bucketed by length (longest first, so the first batch
    shows the peak memory), and padding only reaches the longest row of each batch.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i]) if sort else list(range(len(lengths)))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        new_longest = max(longest, lengths[i])
        too_big = current and (new_longest * (len(current) + 1) > max_tokens
                               or (max_batch is not None and len(current) >= max_batch))
        if too_big:
            batches.append(current)
            current, new_longest = [], lengths[i]
        current.append(i)
        longest = new_longest
    if current:
        batches.append(current)
    return batches
