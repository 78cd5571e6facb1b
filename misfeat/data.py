"""Prompt sets: the JSONL format, chat rendering, and tokenisation with position masks.

A prompt set is a JSONL file, one record per line::

    {"id": "q1", "prompt": "how do i treat a cut", "response": "clean it", "domain": "health"}
    {"id": "q2", "messages": [{"role": "user", "content": "hi"}], "label": "aligned"}

Each record has an ``id`` and either ``prompt`` (one user turn) or ``messages`` (a chat,
roles ``system``/``user``/``assistant``); ``response``, ``domain`` and ``label`` are
optional, and any other field is kept in ``extra``. Prompt-set specs of a plug-in
(``organism:heldout`` and friends) resolve through :mod:`misfeat.registry`.

Tokenisation renders each record with a chat format, prepends BOS where the model
expects it, and returns padded batches with boolean masks over the prompt tokens, the
response tokens and the last prompt token (the position that predicts the response).
This is the single place that knows what ``positions='prompt'|'response'|'last'|'all'``
means; the cache, the evaluation and the interventions all read these masks.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from misfeat import registry
from misfeat.errors import MisfeatError

if TYPE_CHECKING:
    import torch
    from transformer_lens import HookedTransformer

POSITIONS = ("all", "prompt", "response", "last")
CHAT_FORMATS = ("auto", "organism", "template", "raw")
_KNOWN_FIELDS = ("id", "prompt", "messages", "response", "domain", "label")
_ROLES = ("system", "user", "assistant")


class PromptFileError(MisfeatError):
    """A prompt file or record is malformed; the message names the file, line and problem."""


@dataclass(frozen=True)
class PromptRecord:
    """One prompt of a prompt set (see the module docstring for the fields)."""

    id: str
    prompt: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None
    response: str | None = None
    domain: str | None = None
    label: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    source: str | None = field(default=None, compare=False)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id}
        if self.prompt is not None:
            out["prompt"] = self.prompt
        if self.messages is not None:
            out["messages"] = [{"role": r, "content": c} for r, c in self.messages]
        for key in ("response", "domain", "label"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        out.update(self.extra)
        return out

    def with_response(self, response: str | None) -> PromptRecord:
        return PromptRecord(self.id, self.prompt, self.messages, response, self.domain, self.label,
                            self.extra, self.source)


@dataclass(frozen=True)
class PromptSet:
    """An ordered, immutable list of :class:`PromptRecord` with a name and metadata."""

    name: str
    records: tuple[PromptRecord, ...]
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[PromptRecord]:
        return iter(self.records)

    def __getitem__(self, index: int) -> PromptRecord:
        return self.records[index]

    def __repr__(self) -> str:
        return f"PromptSet({self.name!r}, {len(self)} records, domains={self.domains()})"

    def domains(self) -> list[str]:
        return sorted({r.domain for r in self.records if r.domain is not None})

    def filter(self, *, domain: str | Sequence[str] | None = None, label: str | None = None,
               name: str | None = None) -> PromptSet:
        """The records of the given domain(s) and/or label, in order."""
        domains = {domain} if isinstance(domain, str) else set(domain) if domain is not None else None
        keep = tuple(
            r for r in self.records
            if (domains is None or r.domain in domains) and (label is None or r.label == label)
        )
        return PromptSet(name or f"{self.name}[{domain or ''}{':' + label if label else ''}]", keep, self.meta)

    def contrast(self) -> tuple[str, str]:
        """The (positive, negative) labels of a labelled text set, from ``meta['contrast']``."""
        pair = self.meta.get("contrast")
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise MisfeatError(f"prompt set {self.name!r} names no contrast: set meta['contrast'] = "
                               "[positive label, negative label], or pass the two labels")
        return str(pair[0]), str(pair[1])

    def with_responses(self, responses: Sequence[str | None], name: str | None = None) -> PromptSet:
        if len(responses) != len(self):
            raise ValueError(f"{len(responses)} responses for {len(self)} prompts")
        recs = tuple(r.with_response(x) for r, x in zip(self.records, responses, strict=True))
        return PromptSet(name or self.name, recs, self.meta)

    @functools.cached_property
    def hash(self) -> str:
        """sha256 of the records' canonical JSON: equal sets have equal hashes (computed once
        per set: ~20 us a record, as much as a cached run's other host work per prompt)."""
        digest = hashlib.sha256()
        for record in self.records:
            digest.update(json.dumps(record.to_json(), sort_keys=True).encode())
            digest.update(b"\n")
        return digest.hexdigest()[:16]

    def to_jsonl(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w") as f:
            for record in self.records:
                f.write(json.dumps(record.to_json()) + "\n")
        os.replace(tmp, path)
        return path


# --- reading -------------------------------------------------------------------------


def load_prompts(spec: str | os.PathLike | PromptSet | Iterable[PromptRecord]) -> PromptSet:
    """A prompt set from a spec: a JSONL path, a plug-in's ``<name>:<set>`` (e.g. ``organism:heldout``),
    or a loaded set."""
    if isinstance(spec, PromptSet):
        return spec
    if isinstance(spec, (str, os.PathLike)):
        text = str(spec)
        plugin = registry.for_spec(text)
        if plugin is not None and plugin.prompts is not None:
            return plugin.prompts(text)
        return read_jsonl(text)
    records = tuple(spec)
    if not all(isinstance(r, PromptRecord) for r in records):
        raise TypeError("load_prompts takes a path, an organism:<set> spec, a PromptSet or PromptRecords")
    return PromptSet("<records>", records)


def read_jsonl(path: str | os.PathLike) -> PromptSet:
    """Read a JSONL prompt file; any malformed line raises :class:`PromptFileError`."""
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"{path}: no such prompt file")
    records: list[PromptRecord] = []
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise PromptFileError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from None
            record = parse_record(obj, where)
            if record.id in seen:
                raise PromptFileError(f"{where}: duplicate id {record.id!r} (first on line {seen[record.id]})")
            seen[record.id] = lineno
            records.append(record)
    if not records:
        raise PromptFileError(f"{path}: the prompt file is empty; it needs one JSON record per line")
    return PromptSet(path.stem, tuple(records), {"path": str(path)})


def parse_record(obj: Any, where: str = "<record>") -> PromptRecord:
    """Validate one decoded JSON record (``where`` names it in errors)."""
    if not isinstance(obj, dict):
        raise PromptFileError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "id" not in obj:
        raise PromptFileError(f"{where}: missing field 'id'")
    if not isinstance(obj["id"], (str, int)) or isinstance(obj["id"], bool):
        raise PromptFileError(f"{where}: 'id' must be a string or an integer")
    has_prompt, has_messages = "prompt" in obj, "messages" in obj
    if has_prompt == has_messages:
        what = "both" if has_prompt else "neither"
        raise PromptFileError(f"{where}: a record needs exactly one of 'prompt' or 'messages' (it has {what})")
    prompt = messages = None
    if has_prompt:
        prompt = obj["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise PromptFileError(f"{where}: 'prompt' must be a non-empty string")
    else:
        messages = _parse_messages(obj["messages"], where)
    for key in ("response", "domain", "label"):
        if key in obj and obj[key] is not None and not isinstance(obj[key], str):
            raise PromptFileError(f"{where}: '{key}' must be a string")
    for key in ("aligned", "misaligned"):  # reference answers: a string would be scored letter by letter
        if obj.get(key) is not None and not _answer_list(obj[key]):
            raise PromptFileError(f"{where}: '{key}' must be a list of answer strings, e.g. [\"rest\"], "
                                  f"not {type(obj[key]).__name__} {obj[key]!r}")
    extra = {k: v for k, v in obj.items() if k not in _KNOWN_FIELDS}
    return PromptRecord(str(obj["id"]), prompt, messages, obj.get("response"), obj.get("domain"),
                        obj.get("label"), extra, where)


def _answer_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(a, str) and a for a in value)


def _parse_messages(raw: Any, where: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(raw, list) or not raw:
        raise PromptFileError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    out = []
    for i, msg in enumerate(raw):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise PromptFileError(f"{where}: messages[{i}] must be an object with 'role' and 'content'")
        if msg["role"] not in _ROLES:
            raise PromptFileError(f"{where}: messages[{i}] has role {msg['role']!r}; use one of {', '.join(_ROLES)}")
        if not isinstance(msg["content"], str):
            raise PromptFileError(f"{where}: messages[{i}].content must be a string")
        out.append((msg["role"], msg["content"]))
    if out[-1][0] == "assistant":
        raise PromptFileError(f"{where}: the last message is the assistant's; put it in 'response' instead")
    return tuple(out)


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
    if fmt == "auto" and isinstance(prompts, PromptSet) and prompts.meta.get("chat_format") in CHAT_FORMATS:
        fmt = prompts.meta["chat_format"]  # the set says how it must be rendered (e.g. raw documents)
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
