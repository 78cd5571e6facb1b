"""Batched generation with a KV cache, left padding and position masks.

During generation the forward passes run inside :func:`misfeat.hooks.position_masks`,
so an intervention restricted to ``prompt``, ``last`` or ``response`` positions acts on
the same tokens as in a scoring forward: the prefill sees the prompt masks, and every
newly generated token counts as ``response``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from misfeat.data import PromptRecord, PromptSet, batch_by_tokens, collate, encode, pad_id_of
from misfeat.hooks import position_masks
from misfeat.io import progress

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


@dataclass(frozen=True)
class Completion:
    """One generated continuation: its text, its token ids and why it stopped."""

    prompt_index: int
    text: str
    ids: tuple[int, ...]
    stopped: bool


# end-of-turn tokens of common chat templates, used when the tokenizer has them as special tokens
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|im_end|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "<|end_of_text|>",
                      "</s>", "<eos>")


def stop_ids_of(model: HookedTransformer, stop_words: Sequence[str] = ()) -> list[int]:
    """Token ids that end a completion: the EOS / end-of-turn ids of the model's
    ``generation_config.json`` and ``config.json`` (kept when it was loaded), the
    tokenizer's EOS, its special end-of-turn tokens, and each stop word that is one token.
    Multi-token stop words are matched on the text (see :func:`generate`)."""
    from misfeat.models import model_info

    tok = model.tokenizer
    ids = list(model_info(model).meta.get("eos_token_ids", ()))
    if tok.eos_token_id is not None:
        ids.append(tok.eos_token_id)
    special = set(getattr(tok, "all_special_tokens", ()))
    ids += [tok.convert_tokens_to_ids(t) for t in END_OF_TURN_TOKENS if t in special]
    for word in stop_words:
        enc = tok(word, add_special_tokens=False)["input_ids"]
        if len(enc) == 1:
            ids.append(enc[0])
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


def _cut_at_stop_words(text: str, stop_words: Sequence[str]) -> tuple[str, bool]:
    cut = min((i for i in (text.find(w) for w in stop_words if w) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def generate(
    model: HookedTransformer,
    prompts: PromptSet | Sequence[PromptRecord],
    *,
    max_new_tokens: int = 16,
    temperature: float = 0.0,
    stop_words: Sequence[str] = (),
    samples_per_prompt: int = 1,
    seed: int = 0,
    max_batch_tokens: int = 16384,
    fmt: str = "auto",
    use_cache: bool = True,
) -> list[Completion]:
    """Complete each prompt (greedy when ``temperature == 0``), ``samples_per_prompt`` times.

    Batched with a KV cache (``use_cache=False`` recomputes the whole sequence each step:
    the reference the cached path is tested against). A completion stops at the model's
    EOS / end-of-turn ids (see :func:`stop_ids_of`) or at any of ``stop_words`` (strings of
    any length, matched on the decoded text). Completions are returned in prompt order
    (samples of a prompt together); the stop token, if reached, is kept in ``ids`` but
    neither it nor a stop word is in ``text``.
    """
    import torch

    records = list(prompts)
    encoded = encode(records, model, fmt=fmt, with_response=False)
    jobs = [(i, e) for i, e in enumerate(encoded) for _ in range(samples_per_prompt)]
    width = max(len(e) for e in encoded) + max_new_tokens
    if width > model.cfg.n_ctx:
        max_new_tokens = max(1, model.cfg.n_ctx - max(len(e) for e in encoded))
    stop_list = stop_ids_of(model, stop_words)
    stop = torch.tensor(stop_list, device=model.cfg.device, dtype=torch.long)
    text_stops = tuple(w for w in stop_words  # single-token words are already stop ids
                       if w and len(model.tokenizer(w, add_special_tokens=False)["input_ids"]) != 1)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out: list[Completion | None] = [None] * len(jobs)
    groups = batch_by_tokens([len(e) + max_new_tokens for _, e in jobs], max_batch_tokens)
    for group in progress(groups, desc="generate", unit="batch"):
        batch = collate([jobs[j][1] for j in group], pad_id_of(model), "left", device=model.cfg.device)
        new_ids, finished = _generate_batch(model, batch, max_new_tokens, temperature, stop, gen, text_stops,
                                            use_cache)
        for row, j in enumerate(group):
            ids = new_ids[row].tolist()
            n = next((k for k, t in enumerate(ids) if t in stop_list), len(ids))
            text = model.tokenizer.decode(ids[:n], skip_special_tokens=True)
            text, hit = _cut_at_stop_words(text, stop_words)
            out[j] = Completion(jobs[j][0], text.strip(), tuple(ids[: n + 1] if n < len(ids) else ids),
                                bool(finished[row]) or hit)
    return [c for c in out if c is not None]


def _generate_batch(model, batch, max_new_tokens, temperature, stop, gen, text_stops=(), use_cache=True):
    import torch
    from transformer_lens import TransformerLensKeyValueCache

    n = batch.tokens.shape[0]
    device = batch.tokens.device
    cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, n) if use_cache else None
    attention = batch.attention_mask.long()
    masks = batch.masks()
    finished = torch.zeros(n, dtype=torch.bool, device=device)
    produced: list[torch.Tensor] = []
    one = torch.ones(n, 1, dtype=torch.bool, device=device)
    new_masks = {"all": one, "response": one, "prompt": ~one, "last": ~one}
    tokens = batch.tokens
    with torch.inference_mode():
        with position_masks(masks):
            logits = model(tokens, attention_mask=attention, past_kv_cache=cache)[:, -1]
        for step in range(max_new_tokens):
            next_ids = _pick(logits, temperature, gen)
            next_ids = torch.where(finished, torch.full_like(next_ids, pad_id_of(model)), next_ids)
            produced.append(next_ids)
            if stop.numel():
                finished |= torch.isin(next_ids, stop)
            if text_stops:
                finished |= _hit_stop_words(model, produced, finished, text_stops)
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            if use_cache:
                with position_masks(new_masks):
                    logits = model(next_ids[:, None], attention_mask=torch.ones_like(next_ids)[:, None],
                                   past_kv_cache=cache)[:, -1]
            else:  # the reference path: the whole sequence again, masks extended by one response column
                tokens = torch.cat([tokens, next_ids[:, None]], dim=1)
                attention = torch.cat([attention, torch.ones_like(next_ids)[:, None]], dim=1)
                masks = {k: torch.cat([v, new_masks[k]], dim=1) for k, v in masks.items()}
                with position_masks(masks):
                    logits = model(tokens, attention_mask=attention)[:, -1]
    return torch.stack(produced, dim=1), finished


def _hit_stop_words(model, produced, finished, text_stops):
    import torch

    ids = torch.stack(produced, dim=1).tolist()
    hit = [not done and any(w in model.tokenizer.decode(row, skip_special_tokens=True) for w in text_stops)
           for row, done in zip(ids, finished.tolist(), strict=True)]
    return torch.tensor(hit, dtype=torch.bool, device=finished.device)


def _pick(logits, temperature: float, gen):
    import torch

    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1).cpu()
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1).to(logits.device)
