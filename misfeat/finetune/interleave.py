"""Interleaving a safe pool into the fine-tuning data, and the perplexity-gap scorer
(Kaczer et al. 2025, Interleaving / Interleaving+ / Interleaving++).

s_d = (mean_k NLL_mis_k(d) - NLL_aligned(d)) / (NLL_aligned(d) + eps), eps = 1.0, where
NLL is the mean negative log-likelihood per answer token of d's response given its prompt
(prompt masked). A high s_d: the aligned model finds d much likelier than the misaligned
ones do, so d pulls a fine-tune back toward alignment.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from misfeat.errors import MisfeatError
from misfeat.finetune.engine import Defence

if TYPE_CHECKING:
    import torch
    from transformer_lens import HookedTransformer

    from misfeat.data import PromptRecord, PromptSet

REFUSAL_WORDS = ("sorry", "apologize", "cannot", "can't", "i'm unable", "i am unable")


def is_refusal(record: PromptRecord) -> bool:
    """The paper's ``++`` filter: a refusal marker in the response's first 10 lowercased words."""
    head = " ".join((record.response or "").lower().split()[:10])
    return any(word in head for word in REFUSAL_WORDS)


def answer_nll(model: HookedTransformer, records: PromptSet | Sequence[PromptRecord]) -> torch.Tensor:
    """``[n]``: mean negative log-likelihood per response token of each record (prompt masked)."""
    import torch

    from misfeat.data import encode
    from misfeat.evaluate import response_logprobs

    records = list(records)
    n_tokens = torch.tensor([len(e) - e.n_prompt for e in encode(records, model)], dtype=torch.float32)
    if bool((n_tokens == 0).any()):
        bad = records[int((n_tokens == 0).nonzero()[0])].id
        raise MisfeatError(f"record {bad!r} has a response that tokenises to nothing")
    return -response_logprobs(model, records) / n_tokens


@dataclass(frozen=True)
class GapScores:
    """Per pool record: the gap score ``s`` and the NLLs it came from (``misaligned [K, n]``)."""

    s: tuple[float, ...]
    nll_aligned: tuple[float, ...]
    nll_misaligned: tuple[tuple[float, ...], ...]
    eps: float

    def to_dict(self) -> dict[str, Any]:
        return {"s": list(self.s), "nll_aligned": list(self.nll_aligned),
                "nll_misaligned": [list(x) for x in self.nll_misaligned], "eps": self.eps}


def perplexity_gap(aligned: HookedTransformer, misaligned: Sequence[HookedTransformer],
                   pool: PromptSet | Sequence[PromptRecord], *, eps: float = 1.0,
                   held_out: Sequence[int] = ()) -> GapScores:
    """s_d for every record of ``pool``, averaged over the ``misaligned`` models except the
    indices in ``held_out`` (e.g. the attacked domain's model)."""
    models = [m for i, m in enumerate(misaligned) if i not in set(held_out)]
    if not models:
        raise MisfeatError("perplexity_gap needs at least one misaligned model (after holding out)")
    for k, m in enumerate(models):
        _check_same_vocabulary(aligned, m, k)
    pool = _checked_pool(pool)
    base = answer_nll(aligned, pool)
    mis = [answer_nll(m, pool) for m in models]
    import torch

    s = (torch.stack(mis).mean(0) - base) / (base + eps)
    return GapScores(tuple(s.tolist()), tuple(base.tolist()), tuple(tuple(m.tolist()) for m in mis), eps)


def _check_same_vocabulary(aligned: HookedTransformer, other: HookedTransformer, k: int) -> None:
    """NLLs per token are only comparable under one tokenizer: refuse a misaligned model with another."""
    tok, other_tok = aligned.tokenizer, other.tokenizer
    if other.cfg.d_vocab != aligned.cfg.d_vocab or (
            tok is not None and other_tok is not None and tok.get_vocab() != other_tok.get_vocab()):
        raise MisfeatError(f"perplexity_gap: misaligned model {k} has another vocabulary than the aligned model "
                           f"({other.cfg.d_vocab} vs {aligned.cfg.d_vocab} tokens, or tokens mapped differently); "
                           "the gap compares NLL per token, so use models with the same tokenizer")


def rank_pool(pool: PromptSet, scores: Sequence[float], *, top_n: int | None = None,
              keep: Callable[[PromptRecord], bool] | None = None) -> PromptSet:
    """``pool`` sorted by score (highest first; ties by position), filtered by ``keep``, cut to ``top_n``;
    each record carries its score as ``extra['gap_score']``."""
    import dataclasses

    from misfeat.data import PromptSet

    if len(scores) != len(pool):
        raise MisfeatError(f"{len(scores)} scores for a pool of {len(pool)} records")
    order = sorted(range(len(pool)), key=lambda i: (-scores[i], i))
    ranked = [dataclasses.replace(pool[i], extra={**pool[i].extra, "gap_score": float(scores[i])})
              for i in order if keep is None or keep(pool[i])]
    return PromptSet(f"{pool.name}[ranked]", tuple(ranked[:top_n] if top_n else ranked), pool.meta)


def _checked_pool(pool: PromptSet | Sequence[PromptRecord]) -> PromptSet:
    from misfeat.data import PromptSet, load_prompts

    pool = load_prompts(pool) if not isinstance(pool, PromptSet) else pool
    if not len(pool):
        raise MisfeatError("the safe pool is empty; give records with a prompt and a response")
    missing = [r.id for r in pool if not r.response]
    if missing:
        raise MisfeatError(f"the safe pool needs a 'response' on every record; {len(missing)} lack one "
                           f"(first: {missing[0]!r})")
    return pool


@dataclass(eq=False)
class Interleave(Defence):
    """Add ``round(fraction * len(data))`` (at least 1) safe-pool records to the training data
    (|D_safe| = fraction x |D_fine|, paper 5%; the engine's shuffled epochs mix them in).

    ``selection='random'``: a seeded random sample. ``'gap'``: the top ``top_n`` by the
    perplexity gap (``scores`` given, or computed from ``aligned`` and ``misaligned``), then a
    seeded sample of the needed size from them (``top_n`` None: the top ones directly).
    ``keep``: a predicate applied first (e.g. ``lambda r: not is_refusal(r)``, the ``++`` variant).
    """

    pool: Any
    fraction: float = 0.05
    selection: str = "random"
    scores: Sequence[float] | None = None
    aligned: Any = None
    misaligned: Sequence[Any] = ()
    held_out: Sequence[int] = ()
    eps: float = 1.0
    top_n: int | None = None
    keep: Callable[[Any], bool] | None = None
    seed: int = 0
    name: str = "interleave"

    def __post_init__(self) -> None:
        if not 0 <= self.fraction <= 1:
            raise MisfeatError(f"interleave fraction must be in [0, 1], got {self.fraction}")
        if self.fraction > 0.5:
            raise MisfeatError(f"interleave fraction {self.fraction} is above 0.5: the safe data would outweigh "
                               "the task; use 0-0.5 (paper 0.05)")
        if self.selection not in ("random", "gap"):
            raise MisfeatError(f"interleave selection must be random or gap, got {self.selection!r}")
        if self.selection == "gap" and self.scores is None and (self.aligned is None or not self.misaligned):
            raise MisfeatError("gap selection needs scores, or an aligned and at least one misaligned model")
        self.pool = _checked_pool(self.pool)
        if self.scores is not None and len(self.scores) != len(self.pool):
            raise MisfeatError(f"{len(self.scores)} scores for a pool of {len(self.pool)} records")
        self._chosen: PromptSet | None = None

    def select(self, n: int) -> PromptSet:
        """The ``n`` pool records this defence adds."""
        from misfeat.data import PromptSet

        pool = self.pool
        if self.selection == "gap":
            scores = self.scores if self.scores is not None else perplexity_gap(
                self.aligned, self.misaligned, pool, eps=self.eps, held_out=self.held_out).s
            candidates = list(rank_pool(pool, scores, top_n=self.top_n or n, keep=self.keep))
        else:
            candidates = [r for r in pool if self.keep is None or self.keep(r)]
        if len(candidates) < n:
            raise MisfeatError(f"interleave needs {n} safe records but the pool offers {len(candidates)} "
                               f"(after the filter{' and top_n' if self.top_n else ''}); give a larger pool")
        rng = random.Random(self.seed)
        chosen = candidates[:n] if (self.selection == "gap" and not self.top_n) else rng.sample(candidates, n)
        return PromptSet(f"{pool.name}[{self.selection}:{n}]", tuple(chosen), pool.meta)

    def transform_data(self, data: PromptSet, model) -> PromptSet:
        from misfeat.data import PromptSet

        n = max(1, round(self.fraction * len(data))) if self.fraction > 0 else 0
        if n == 0:
            return data
        self._chosen = self.select(n)
        return PromptSet(f"{data.name}+{self._chosen.name}", data.records + self._chosen.records, data.meta)

    def describe(self):
        return {"name": self.name, "kind": "interleave", "fraction": self.fraction, "selection": self.selection,
                "pool": {"name": self.pool.name, "hash": self.pool.hash, "n": len(self.pool)},
                "top_n": self.top_n, "eps": self.eps, "held_out": list(self.held_out), "seed": self.seed,
                "filter": getattr(self.keep, "__name__", None) if self.keep else None,
                "scores": _scores_hash(self.scores) if self.scores is not None else
                ("computed" if self.selection == "gap" else None)}


def _scores_hash(scores: Sequence[float]) -> str:
    import hashlib
    import json

    return "given:" + hashlib.sha256(json.dumps([float(x) for x in scores]).encode()).hexdigest()[:16]


def not_refusal(record: PromptRecord) -> bool:
    """``keep`` predicate of Interleaving++: drop refusals (:func:`is_refusal`)."""
    return not is_refusal(record)
