"""Chat templates: render a conversation with the tokenizer's template, and find where the
assistant's response sits in it (content plus the end-of-turn text the template appends)."""

from __future__ import annotations

from typing import Any


def apply_template(tokenizer: Any, msgs: list[dict[str, str]], where: str, add_generation_prompt: bool) -> str:
    """The tokenizer's chat template applied to ``msgs`` as text; a template error names ``where``."""
    from misfeat.data import PromptFileError

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
