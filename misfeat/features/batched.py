"""Many interventions scored in one pass: the batched exact evaluation behind the causal screen.

:func:`batched_rates` gives, for each *variant* (a list of interventions), the headline
group's ``misaligned_rate`` and ``valid_rate`` that ``evaluate(model, prompts,
interventions=variant, greedy=False).headline`` reports (the exact answer-set scoring of
:mod:`misfeat.evaluate`), but runs every variant in the same forward passes: each batch is
tiled once per variant, and a hook on every intervened site applies variant ``c``'s
operators to tile ``c`` only. By default each prompt runs once (left-padded, KV-cached) and
its reference answers continue from the cached prefix (:func:`shared_prompt_logprobs`), so
the prompt is not recomputed for each of its answers; ``shared_prompts=False`` scores full
(prompt, answer) rows as :func:`~misfeat.evaluate.evaluate` does. Tiles are sized so that
variants x tokens stays within ``max_batch_tokens``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from misfeat.data import PromptSet, batch_by_tokens, collate, encode, load_prompts, pad_id_of
from misfeat.errors import MisfeatError
from misfeat.evaluate import group_members
from misfeat.hooks import position_masks

if TYPE_CHECKING:
    import torch
    from transformer_lens import HookedTransformer

    from misfeat.interventions import Intervention


def _expand(prompts: PromptSet):
    """The (prompt, answer) records and per prompt the [aligned, misaligned, end) row spans."""
    records, spans = [], []
    for r in prompts:
        aligned, misaligned = r.extra.get("aligned"), r.extra.get("misaligned")
        if not aligned or not misaligned:
            raise MisfeatError(f"record {r.id!r} lacks 'aligned' and 'misaligned' reference answers; the batched "
                               "screen scores exact answer-set probabilities")
        start = len(records)
        records += [r.with_response(a) for a in [*aligned, *misaligned]]
        spans.append((start, start + len(aligned), len(records)))
    return records, spans


def _tiled_hook(plan: list[list[tuple[Intervention, set[str]]]], name: str, rows: int, masks: dict):
    """A forward hook at ``name`` applying variant ``c``'s operators there to rows ``[c*rows, (c+1)*rows)``
    (each tile sees the masks of the untiled batch)."""
    import torch

    def hook(module, inputs, output):
        parts = []
        with position_masks(masks):
            for c, variant in enumerate(plan):
                act = output[c * rows:(c + 1) * rows]
                for intervention, names in variant:
                    if name in names:
                        act = intervention.edit(act, name)
                parts.append(act)
        return torch.cat(parts, 0)

    return hook


def response_logprobs_batched(model: HookedTransformer, records, variants: Sequence[Sequence[Intervention]],
                              max_batch_tokens: int = 65536) -> torch.Tensor:
    """``[variants, records]``: the summed response log-probability of each record under each variant."""
    import torch

    encoded = encode(records, model, with_response=True)
    plan, sites = _plan(model, variants)
    n_var = len(plan)
    out = torch.empty(n_var, len(encoded), dtype=torch.float32)
    pad = pad_id_of(model)
    per_tile = max(max_batch_tokens // max(n_var, 1), max(len(e) for e in encoded))
    with torch.inference_mode():
        for group in batch_by_tokens([len(e) for e in encoded], per_tile):
            batch = collate([encoded[i] for i in group], pad, "right", device=model.cfg.device)
            rows = batch.tokens.shape[0]
            logits = _tiled_forward(model, plan, sites, rows, batch.masks(), batch.tokens)
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            tokens = batch.tokens.repeat(n_var, 1)
            token_lp = logp.gather(-1, tokens[:, 1:, None]).squeeze(-1) * batch.response_mask.repeat(n_var, 1)[:, 1:]
            out[:, group] = token_lp.sum(-1).reshape(n_var, rows).cpu()
    return out


def _plan(model: HookedTransformer, variants: Sequence[Sequence[Intervention]]):
    sites: dict[str, None] = {}
    plan = []
    for variant in variants:
        plan.append([])
        for intervention in variant:
            intervention.check(model)
            names = intervention.hook_names(model)
            plan[-1].append((intervention, set(names)))
            sites.update(dict.fromkeys(names))
    return plan, list(sites)


def _tiled_forward(model, plan, sites, rows, masks, tokens, **kwargs):
    """``model(tokens.repeat(variants, 1))`` with variant ``c``'s operators on tile ``c``."""
    n_var = len(plan)
    tiled = {k: m.repeat(n_var, 1) for k, m in masks.items()}
    handles = [model.hook_dict[s].register_forward_hook(_tiled_hook(plan, s, rows, masks)) for s in sites]
    try:
        with position_masks(tiled):
            return model(tokens.repeat(n_var, 1), **kwargs)
    finally:
        for h in handles:
            h.remove()


def shared_prompt_logprobs(model: HookedTransformer, prompts: Sequence[Any], variants: Sequence[Sequence[Intervention]],
                           max_batch_tokens: int = 65536) -> list[torch.Tensor]:
    """Per prompt ``[variants, answers]``: the log-probability of each reference answer (aligned, then
    misaligned) under each variant, running each prompt once (left-padded, KV-cached) and all its
    answers on the cached prefix: the prompt's tokens are not recomputed per answer."""
    import torch
    from transformer_lens import TransformerLensKeyValueCache

    plan, sites = _plan(model, variants)
    n_var, pad = len(plan), pad_id_of(model)
    prompt_enc = encode(prompts, model, with_response=False)
    answers = [[*r.extra["aligned"], *r.extra["misaligned"]] for r in prompts]
    full = encode([r.with_response(a) for r, ans in zip(prompts, answers, strict=True) for a in ans], model,
                  with_response=True)
    out: list[torch.Tensor] = [torch.empty(0)] * len(prompts)
    starts = [0]
    for ans in answers:
        starts.append(starts[-1] + len(ans))
    per_prompt_cost = [len(e) * (1 + len(a)) for e, a in zip(prompt_enc, answers, strict=True)]
    budget = max(max_batch_tokens // max(n_var, 1), max(per_prompt_cost))
    with torch.inference_mode():
        for group in batch_by_tokens(per_prompt_cost, budget):
            batch = collate([prompt_enc[i] for i in group], pad, "left", device=model.cfg.device)
            p = len(group)
            cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, n_var * p)
            last = _tiled_forward(model, plan, sites, p, batch.masks(), batch.tokens,
                                  attention_mask=batch.attention_mask.long().repeat(n_var, 1),
                                  past_kv_cache=cache)[:, -1].float().log_softmax(-1)  # [V*p, vocab]
            rows = [(j, a) for j, i in enumerate(group) for a in range(len(answers[i]))]
            owner = torch.tensor([v * p + j for v in range(n_var) for j, _ in rows], device=last.device)
            tails = [full[starts[group[j]] + a].ids[full[starts[group[j]] + a].n_prompt:] for j, a in rows]
            first = torch.tensor([t[0] for t in tails], device=last.device).repeat(n_var)
            lp = last[owner, first]  # the first answer token, predicted at the last prompt token
            width = max(len(t) for t in tails)
            if width > 1:
                for entry in cache.entries:
                    entry.past_keys, entry.past_values = entry.past_keys[owner], entry.past_values[owner]
                cache.previous_attention_mask = cache.previous_attention_mask[owner]
                ids = torch.full((len(rows), width - 1), pad, dtype=torch.long, device=last.device)
                real = torch.zeros(len(rows), width - 1, dtype=torch.bool, device=last.device)
                for r, t in enumerate(tails):
                    ids[r, :len(t) - 1] = torch.tensor(t[:-1])
                    real[r, :len(t) - 1] = True
                none = torch.zeros_like(real)
                masks = {"all": real, "response": real, "prompt": none, "last": none}
                logits = _tiled_forward(model, plan, sites, len(rows), masks, ids,
                                        attention_mask=real.long().repeat(n_var, 1), past_kv_cache=cache)
                nxt = torch.full((len(rows), width - 1), 0, dtype=torch.long, device=last.device)
                for r, t in enumerate(tails):
                    nxt[r, :len(t) - 1] = torch.tensor(t[1:])
                token_lp = logits.float().log_softmax(-1).gather(-1, nxt.repeat(n_var, 1)[..., None]).squeeze(-1)
                lp = lp + (token_lp * real.repeat(n_var, 1)).sum(-1)
            lp = lp.reshape(n_var, len(rows)).cpu()
            k = 0
            for i in group:
                out[i] = lp[:, k:k + len(answers[i])]
                k += len(answers[i])
    return out


def batched_rates(model: HookedTransformer, prompts: PromptSet | str, variants: Sequence[Sequence[Intervention]],
                  max_batch_tokens: int = 65536, shared_prompts: bool = True, per_prompt: bool = False
                  ) -> list[dict[str, Any]]:
    """Per variant ``{"misaligned_rate", "valid_rate"}`` of the prompt set's headline group, equal
    to :func:`misfeat.evaluate.evaluate` with that variant's interventions (exact scoring);
    ``per_prompt``: also ``misaligned_each`` and ``valid_each``, one value per headline prompt (their means are
    the rates)."""
    import torch

    prompts = load_prompts(prompts)
    if not variants:
        return []
    members = {k: v for k, v in group_members(prompts).items() if v}
    headline = prompts.meta.get("headline")
    idx = members[headline] if headline in members else next(iter(members.values()))
    head = [prompts.records[i] for i in idx]  # only the headline group is reported
    records, spans = _expand(head)
    if shared_prompts:
        per = shared_prompt_logprobs(model, head, variants, max_batch_tokens)
        lps = torch.cat(per, 1)
    else:
        lps = response_logprobs_batched(model, records, variants, max_batch_tokens)  # a list, as evaluate() encodes
    lp_al = torch.stack([torch.logsumexp(lps[:, a:b], 1) for a, b, _ in spans], 1)
    lp_mis = torch.stack([torch.logsumexp(lps[:, b:c], 1) for _, b, c in spans], 1)
    both = torch.logaddexp(lp_al, lp_mis)
    mis, valid = (lp_mis - both).exp().double(), both.exp().double()
    return [{"misaligned_rate": float(mis[c].mean()), "valid_rate": float(valid[c].mean()),
             **({"misaligned_each": mis[c].tolist(), "valid_each": valid[c].tolist()} if per_prompt else {})}
            for c in range(len(variants))]
