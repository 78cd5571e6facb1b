"""Prompt sets: the JSONL format, records, reading and plug-in specs.

A prompt set is a JSONL file, one record per line::

    {"id": "q1", "prompt": "how do i treat a cut", "response": "clean it", "domain": "health"}
    {"id": "q2", "messages": [{"role": "user", "content": "hi"}], "label": "aligned"}

Each record has an ``id`` and either ``prompt`` (one user turn) or ``messages`` (a chat,
roles ``system``/``user``/``assistant``); ``response``, ``domain`` and ``label`` are
optional, and any other field is kept in ``extra``. Prompt-set specs of a plug-in
(``organism:heldout`` and friends) resolve through :mod:`misfeat.registry`.

Chat rendering, tokenisation and the position masks live in :mod:`misfeat.encoding`
(its names are importable from here too).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from misfeat import registry
from misfeat.encoding import (  # noqa: F401  (re-exported: `from misfeat.data import collate` keeps working)
    CHAT_FORMATS,
    POSITIONS,
    Encoded,
    TokenBatch,
    batch_by_tokens,
    chat_format_of,
    collate,
    encode,
    pad_id_of,
    render,
    tokenize,
)
from misfeat.errors import MisfeatError, PromptFileError

_KNOWN_FIELDS = ("id", "prompt", "messages", "response", "domain", "label")
_ROLES = ("system", "user", "assistant")


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
    def any_response(self) -> bool:
        """Whether any record has a ``response`` (computed once per set)."""
        return any(r.response for r in self.records)

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
    return parse_jsonl(path.read_bytes(), path)


def parse_jsonl(data: bytes, path: str | os.PathLike) -> PromptSet:
    """The prompt set in ``data``, the bytes of the JSONL file ``path`` (its name, and where errors point)."""
    path = Path(path)
    records: list[PromptRecord] = []
    seen: dict[str, int] = {}
    # decoded as it is read, with universal newlines: as iterating over open(path) does
    for lineno, where, obj in json_lines(io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"), path):
        record = parse_record(obj, where)
        if record.id in seen:
            raise PromptFileError(f"{where}: duplicate id {record.id!r} (first on line {seen[record.id]})")
        seen[record.id] = lineno
        records.append(record)
    if not records:
        raise PromptFileError(f"{path}: the prompt file is empty; it needs one JSON record per line")
    return PromptSet(path.stem, tuple(records), {"path": str(path)})


def json_lines(lines: Iterable[str], path: str | os.PathLike) -> Iterator[tuple[int, str, Any]]:
    """``(line number, "path:line", decoded object)`` for each non-blank line of a JSONL file;
    a line that is not JSON raises :class:`PromptFileError` naming it."""
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            yield lineno, where, json.loads(line)
        except json.JSONDecodeError as err:
            raise PromptFileError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from None


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
