"""Chat templates: render a conversation with the tokenizer's template, and find where the
assistant's response sits in it (content plus the end-of-turn text the template appends)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def apply_template(tokenizer: Any, msgs: list[dict[str, str]], where: str, add_generation_prompt: bool) -> str:
    """The tokenizer's chat template applied to ``msgs`` as text; a template error names ``where``."""
    from misfeat.errors import PromptFileError

    try:
        return tokenizer.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt, tokenize=False)
    except Exception as err:  # jinja2 TemplateError, or raise_exception() inside the template
        hint = ""
        if any(m["role"] == "system" for m in msgs):
            hint = (" (this template does not accept a system turn, as in Gemma and Mistral: merge the system "
                    "text into the first user message, or use a model whose template has a system role)")
        raise PromptFileError(f"{where}: the tokenizer's chat template rejected this record: {err}{hint}") from None


def template_response(tokenizer: Any, msgs: list[dict[str, str]], where: str, prompt_text: str, response: str) -> str:
    """The response as the template writes it after ``prompt_text``: the content plus the
    end-of-turn text (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``), trailing
    whitespace dropped. Falls back to the bare response for templates whose full
    conversation does not start with the generation prompt."""
    full = apply_template(tokenizer, [*msgs, {"role": "assistant", "content": response}], where,
                          add_generation_prompt=False)
    if not full.startswith(prompt_text):
        return response
    tail = full[len(prompt_text):]
    content = response.strip()
    at = tail.find(content)
    if not content or at < 0:
        return response
    end = at + len(content)
    return tail[:end] + tail[end:].rstrip()


def chat_records(path: str | os.PathLike, name: str | None = None, limit: int | None = None):
    """A prompt set from a JSONL of chats in the OpenAI fine-tuning format, as the EM datasets
    ship (Turner/Soligo et al.'s ``bad_medical_advice.jsonl``, Wang et al.'s ``*_incorrect``):
    ``{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}`` per line. The last
    assistant turn becomes the record's ``response``; earlier turns stay in ``messages``.
    Records without a final assistant turn keep no response. ``limit``: the first n lines."""
    from misfeat.data import PromptFileError, PromptSet, json_lines, parse_record

    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"{path}: no such chat file")
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, where, obj in json_lines(f, path) if limit != 0 else ():
            messages = obj.get("messages") if isinstance(obj, dict) else None
            if not isinstance(messages, list) or not messages:
                raise PromptFileError(f"{where}: expected {{\"messages\": [...]}} (the OpenAI chat fine-tuning format)")
            response = None
            if isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
                response = messages[-1].get("content")
                messages = messages[:-1]
            extra = {k: v for k, v in obj.items() if k != "messages"}
            records.append(parse_record({"id": str(obj.get("id", lineno)), **extra, "messages": messages,
                                         "response": response}, where))
            if limit is not None and len(records) >= limit:
                break   # before the next line is read
    if not records:
        raise PromptFileError(f"{path}: no chats in the file")
    return PromptSet(name or path.stem, tuple(records), {"path": str(path)})
