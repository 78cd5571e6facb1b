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

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


@dataclass(frozen=True)
class Completion:
    """One generated continuation: its text, its token ids and why it stopped."""

    prompt_index: int
    text: str
    ids: tuple[int, ...]
    stopped: bool


def stop_ids_of(model: HookedTransformer, stop_words: Sequence[str] = ()) -> list[int]:
    """Token ids that end a completion: EOS plus each stop word that is a single token."""
    tok = model.tokenizer
    ids = [tok.eos_token_id] if tok.eos_token_id is not None else []
    for word in stop_words:
        enc = tok(word, add_special_tokens=False)["input_ids"]
        if len(enc) == 1:
            ids.append(enc[0])
    return ids


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
) -> list[Completion]:
    """Complete each prompt (greedy when ``temperature == 0``), ``samples_per_prompt`` times.

    Completions are returned in prompt order (samples of a prompt together); the stop
    token, if reached, is kept in ``ids`` but not in ``text``.
    """
    import torch

    records = list(prompts)
    encoded = encode(records, model, fmt=fmt, with_response=False)
    jobs = [(i, e) for i, e in enumerate(encoded) for _ in range(samples_per_prompt)]
    width = max(len(e) for e in encoded) + max_new_tokens
    if width > model.cfg.n_ctx:
        max_new_tokens = max(1, model.cfg.n_ctx - max(len(e) for e in encoded))
    stop = torch.tensor(stop_ids_of(model, stop_words), device=model.cfg.device, dtype=torch.long)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out: list[Completion | None] = [None] * len(jobs)
    groups = batch_by_tokens([len(e) + max_new_tokens for _, e in jobs], max_batch_tokens)
    for group in groups:
        batch = collate([jobs[j][1] for j in group], pad_id_of(model), "left", device=model.cfg.device)
        new_ids, finished = _generate_batch(model, batch, max_new_tokens, temperature, stop, gen)
        for row, j in enumerate(group):
            ids = new_ids[row].tolist()
            n = len(ids)
            for k, t in enumerate(ids):
                if t in stop.tolist():
                    n = k
                    break
            text = model.tokenizer.decode(ids[:n], skip_special_tokens=True).strip()
            out[j] = Completion(jobs[j][0], text, tuple(ids[: n + 1] if n < len(ids) else ids),
                                bool(finished[row]))
    return [c for c in out if c is not None]


def _generate_batch(model, batch, max_new_tokens, temperature, stop, gen):
    import torch
    from transformer_lens import TransformerLensKeyValueCache

    n = batch.tokens.shape[0]
    cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, n)
    attention = batch.attention_mask.long()
    masks = {"all": batch.attention_mask, "prompt": batch.prompt_mask, "response": batch.response_mask,
             "last": batch.last_mask}
    finished = torch.zeros(n, dtype=torch.bool, device=batch.tokens.device)
    produced = []
    with torch.inference_mode():
        with position_masks(masks):
            logits = model(batch.tokens, attention_mask=attention, past_kv_cache=cache)[:, -1]
        new_masks = {"all": torch.ones(n, 1, dtype=torch.bool, device=batch.tokens.device),
                     "response": torch.ones(n, 1, dtype=torch.bool, device=batch.tokens.device),
                     "prompt": torch.zeros(n, 1, dtype=torch.bool, device=batch.tokens.device),
                     "last": torch.zeros(n, 1, dtype=torch.bool, device=batch.tokens.device)}
        for step in range(max_new_tokens):
            next_ids = _pick(logits, temperature, gen)
            next_ids = torch.where(finished, torch.full_like(next_ids, pad_id_of(model)), next_ids)
            produced.append(next_ids)
            if stop.numel():
                finished |= torch.isin(next_ids, stop)
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            with position_masks(new_masks):
                logits = model(next_ids[:, None], attention_mask=torch.ones_like(next_ids)[:, None],
                               past_kv_cache=cache)[:, -1]
    return torch.stack(produced, dim=1), finished


def _pick(logits, temperature: float, gen):
    import torch

    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1).cpu()
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1).to(logits.device)
