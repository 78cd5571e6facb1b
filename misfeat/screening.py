"""Data screening by projection difference (Chen et al. 2025, "Persona Vectors", sec. 6, App. I).

Per sample (x, y): ``Delta P = (a(x, y) - a(x, y')) . v_hat``, with ``a`` the mean activation
over the response tokens at the direction's hook and ``y'`` the model's own answer: for
records carrying enumerable ``aligned``/``misaligned`` answer lists, the model's most probable
answer among them (or, ``mode='expected'``, the exact expectation of ``a(x, y')`` under the
model's distribution over them); otherwise its greedy generation. The cheap variant (App. I) needs
no answer of the model: ``a(x, y) . v_hat - h_last(x) . v_hat``, ``h_last`` the activation at
the last prompt token. The dataset score is the mean over samples. A sample whose training
response moves the model further along ``v`` than its own answer has ``Delta P > 0``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from misfeat.errors import MisfeatError

if TYPE_CHECKING:
    import torch
    from transformer_lens import HookedTransformer

    from misfeat.data import PromptRecord, PromptSet

MODES = ("own", "expected", "last_prompt")


@dataclass(frozen=True)
class ScreeningResult:
    """Per-sample projection differences (``scores``, dataset order) and the dataset score."""

    ids: tuple[str, ...]
    scores: tuple[float, ...]
    own_answers: tuple[str | None, ...]
    hook: str
    mode: str
    threshold: float

    @property
    def dataset_score(self) -> float:
        return sum(self.scores) / len(self.scores)

    @property
    def flagged(self) -> tuple[str, ...]:
        """Ids with a score above ``threshold``."""
        return tuple(i for i, s in zip(self.ids, self.scores, strict=True) if s > self.threshold)

    def ranking(self) -> list[int]:
        """Sample indices, highest score first (ties by position)."""
        return sorted(range(len(self.scores)), key=lambda i: (-self.scores[i], i))

    def to_dict(self) -> dict[str, Any]:
        return {"hook": self.hook, "mode": self.mode, "threshold": self.threshold,
                "dataset_score": self.dataset_score, "n": len(self.ids), "n_flagged": len(self.flagged),
                "samples": [{"id": i, "projection_difference": s, "own_answer": a, "flagged": s > self.threshold}
                            for i, s, a in zip(self.ids, self.scores, self.own_answers, strict=True)]}

    def summary(self) -> dict[str, Any]:
        d = self.to_dict()
        return {k: v for k, v in d.items() if k != "samples"} | {
            "top": [d["samples"][i] for i in self.ranking()[:10]]}


def _mean_acts(model: HookedTransformer, records: Sequence[PromptRecord], hook: str, where: str,
               batch_size: int = 64) -> torch.Tensor:
    """``[n, d]``: the mean activation at ``hook`` over each record's ``where`` positions
    (``response`` tokens, or the ``last`` prompt token)."""
    import torch

    from misfeat.data import collate, encode, pad_id_of
    from misfeat.hooks import block_of, position_masks

    encoded = encode(records, model, with_response=where == "response")
    pad, out = pad_id_of(model), []
    block = block_of(hook)
    with torch.inference_mode():
        for i in range(0, len(encoded), batch_size):
            batch = collate(encoded[i:i + batch_size], pad, "right", device=model.cfg.device)
            masks = {"all": batch.attention_mask, "prompt": batch.prompt_mask, "response": batch.response_mask,
                     "last": batch.last_mask}
            with position_masks(masks):
                _, cache = model.run_with_cache(batch.tokens, names_filter=hook,
                                                stop_at_layer=None if block is None else block + 1)
            mask = batch.positions(where).float()
            if bool((mask.sum(1) == 0).any()):
                raise MisfeatError(f"a record has no {where} tokens at {hook}; every record needs a response")
            acts = cache[hook].float()
            out.append((acts * mask[..., None]).sum(1) / mask.sum(1, keepdim=True))
    return torch.cat(out).cpu()


def _answer_options(model: HookedTransformer, records: Sequence[PromptRecord]):
    """``(options, logprobs)`` over the enumerable records: ``options`` a list of ``(record index,
    answer)`` for every answer in ``extra['aligned'] + extra['misaligned']``, ``logprobs [n_options]``."""
    import torch

    from misfeat.evaluate import response_logprobs

    enumerable = [i for i, r in enumerate(records) if r.extra.get("aligned") and r.extra.get("misaligned")]
    for i in enumerable:
        for key in ("aligned", "misaligned"):
            if isinstance(records[i].extra[key], str):
                raise MisfeatError(f"record {records[i].id!r}: '{key}' must be a list of answers, not a string")
    options = [(i, a) for i in enumerable for a in [*records[i].extra["aligned"], *records[i].extra["misaligned"]]]
    if not options:
        return [], torch.empty(0)
    return options, response_logprobs(model, [records[i].with_response(a) for i, a in options])


def own_answers(model: HookedTransformer, records: Sequence[PromptRecord], max_new_tokens: int = 32) -> list[str]:
    """The model's own answer per record: its most probable answer among ``extra['aligned'] +
    extra['misaligned']`` when the record lists them, else its greedy completion."""
    import torch

    from misfeat.data import chat_format_of
    from misfeat.generate import generate

    answers: list[str | None] = [None] * len(records)
    options, lp = _answer_options(model, records)
    best: dict[int, tuple[float, str]] = {}
    for (i, a), v in zip(options, lp.tolist(), strict=True):
        if i not in best or v > best[i][0]:
            best[i] = (v, a)
    for i, (_, a) in best.items():
        answers[i] = a
    free = [i for i in range(len(records)) if answers[i] is None]
    if free:
        stops = (".",) if chat_format_of(model) == "organism" else ()
        with torch.inference_mode():
            done = generate(model, [records[i].with_response(None) for i in free], max_new_tokens=max_new_tokens,
                            stop_words=stops)
        for i, c in zip(free, done, strict=True):
            answers[i] = c.text.strip()
            if not answers[i]:
                raise MisfeatError(f"record {records[i].id!r}: the model's greedy answer is empty; give answer lists "
                                   "or use mode='last_prompt'")
    return answers


def projection_difference(model: HookedTransformer, dataset: PromptSet | str, direction: torch.Tensor, *,
                          hook: str, mode: str = "own", threshold: float = 0.0,
                          max_new_tokens: int = 32) -> ScreeningResult:
    """Per-sample projection difference of ``dataset`` (records with responses) along ``direction``
    at ``hook`` (``blocks.L.hook_resid_post`` = Chen's ``hidden_states[L+1]``); see the module doc.

    ``mode``: ``own`` (y' = the model's own answer), ``expected`` (for records listing their
    answers: a(x, y') replaced by its exact expectation under the model, sum_y' pi(y'|x) a(x, y')
    with pi renormalised over the listed answers; greedy answer otherwise), or ``last_prompt``."""
    import torch

    from misfeat.data import load_prompts
    from misfeat.hooks import check_hooks

    if mode not in MODES:
        raise MisfeatError(f"unknown mode {mode!r}; use {', '.join(MODES)}")
    data = load_prompts(dataset)
    if not len(data):
        raise MisfeatError("the dataset to screen is empty")
    missing = [r.id for r in data if not r.response]
    if missing:
        raise MisfeatError(f"screening needs a 'response' on every record; {len(missing)} lack one "
                           f"(first: {missing[0]!r})")
    check_hooks(model, [hook])
    direction = direction.detach().float().reshape(-1)
    if direction.shape[0] != model.cfg.d_model or not bool(torch.isfinite(direction).all()):
        raise MisfeatError(f"the direction must be a finite {model.cfg.d_model}-dim vector for this model, got "
                           f"{tuple(direction.shape)}{'' if torch.isfinite(direction).all() else ' with NaN/inf'}")
    if float(direction.norm()) == 0:
        raise MisfeatError("the direction is zero")
    unit = direction / direction.norm()
    records = list(data)
    trained = _mean_acts(model, records, hook, "response") @ unit
    if mode in ("own", "expected"):
        answers = own_answers(model, records, max_new_tokens)
        base = _mean_acts(model, [r.with_response(a) for r, a in zip(records, answers, strict=True)],
                          hook, "response") @ unit
        if mode == "expected":
            options, lp = _answer_options(model, records)
            if options:
                proj = _mean_acts(model, [records[i].with_response(a) for i, a in options], hook, "response") @ unit
                index = torch.tensor([i for i, _ in options])
                for i in sorted(set(index.tolist())):
                    sel = index == i
                    base[i] = (torch.softmax(lp[sel], 0) * proj[sel]).sum()
    else:
        answers = [None] * len(records)
        base = _mean_acts(model, records, hook, "last") @ unit
    scores = (trained - base).tolist()
    return ScreeningResult(tuple(r.id for r in records), tuple(scores), tuple(answers), hook, mode, threshold)
