"""Many interventions scored in one pass: the batched exact evaluation behind the causal screen.

:func:`batched_rates` gives, for each *variant* (a list of interventions), the headline
group's ``misaligned_rate`` and ``valid_rate`` that ``evaluate(model, prompts,
interventions=variant, greedy=False).headline`` reports (the exact answer-set scoring of
:mod:`misfeat.evaluate`), but runs every variant in the same forward passes: each token
batch of (prompt, reference answer) rows is tiled once per variant, and a hook on every
intervened site applies variant ``c``'s operators to tile ``c`` only. Tiles are sized so
that variants x rows x width stays within ``max_batch_tokens``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

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
    n_var = len(variants)
    sites: dict[str, None] = {}
    plan = []
    for variant in variants:
        plan.append([])
        for intervention in variant:
            intervention.check(model)
            names = intervention.hook_names(model)
            plan[-1].append((intervention, set(names)))
            sites.update(dict.fromkeys(names))
    out = torch.empty(n_var, len(encoded), dtype=torch.float32)
    pad = pad_id_of(model)
    per_tile = max(max_batch_tokens // max(n_var, 1), max(len(e) for e in encoded))
    with torch.inference_mode():
        for group in batch_by_tokens([len(e) for e in encoded], per_tile):
            batch = collate([encoded[i] for i in group], pad, "right", device=model.cfg.device)
            rows = batch.tokens.shape[0]
            masks = batch.masks()
            tiled = {k: m.repeat(n_var, 1) for k, m in masks.items()}
            handles = [model.hook_dict[s].register_forward_hook(_tiled_hook(plan, s, rows, masks)) for s in sites]
            try:
                with position_masks(tiled):
                    logits = model(batch.tokens.repeat(n_var, 1))
            finally:
                for h in handles:
                    h.remove()
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            tokens = batch.tokens.repeat(n_var, 1)
            token_lp = logp.gather(-1, tokens[:, 1:, None]).squeeze(-1) * tiled["response"][:, 1:]
            out[:, group] = token_lp.sum(-1).reshape(n_var, rows).cpu()
    return out


def batched_rates(model: HookedTransformer, prompts: PromptSet | str, variants: Sequence[Sequence[Intervention]],
                  max_batch_tokens: int = 65536) -> list[dict[str, float]]:
    """Per variant ``{"misaligned_rate", "valid_rate"}`` of the prompt set's headline group, equal
    to :func:`misfeat.evaluate.evaluate` with that variant's interventions (exact scoring)."""
    import torch

    prompts = load_prompts(prompts)
    if not variants:
        return []
    members = {k: v for k, v in group_members(prompts).items() if v}
    headline = prompts.meta.get("headline")
    idx = members[headline] if headline in members else next(iter(members.values()))
    records, spans = _expand([prompts.records[i] for i in idx])  # only the headline group is reported
    lps = response_logprobs_batched(model, records, variants, max_batch_tokens)  # a list, as evaluate() encodes
    lp_al = torch.stack([torch.logsumexp(lps[:, a:b], 1) for a, b, _ in spans], 1)
    lp_mis = torch.stack([torch.logsumexp(lps[:, b:c], 1) for _, b, c in spans], 1)
    both = torch.logaddexp(lp_al, lp_mis)
    mis, valid = (lp_mis - both).exp().double(), both.exp().double()
    return [{"misaligned_rate": float(mis[c].mean()), "valid_rate": float(valid[c].mean())}
            for c in range(len(variants))]
