"""Top-activating examples of a latent: the texts, with the activation on every token.

``top_examples(model, sae, latent, "organism:docs:400")`` returns the prompts on which
the latent fires most, each with per-token activations. In Jupyter the result renders as
HTML (tokens shaded by activation, values on hover); in a terminal ``str()`` gives text
with each active token followed by its value, e.g. ``steal⟨3.1⟩``.
"""

from __future__ import annotations

import html
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from misfeat.data import PromptSet, batch_by_tokens, collate, encode, load_prompts, pad_id_of
from misfeat.hooks import last_layer_of
from misfeat.io import progress, write_jsonl
from misfeat.sae.latents import encode as sae_encode
from misfeat.sae.latents import hook_of

if TYPE_CHECKING:
    from sae_lens import SAE
    from transformer_lens import HookedTransformer


@dataclass(frozen=True)
class Example:
    prompt_index: int
    id: str
    label: str | None
    domain: str | None
    tokens: list[str]
    acts: list[float]

    @property
    def max_act(self) -> float:
        return max(self.acts) if self.acts else 0.0

    def text(self, threshold: float = 0.0) -> str:
        """The decoded text, each token above ``threshold`` followed by its activation."""
        return "".join(f"{t}⟨{a:.2g}⟩" if a > threshold else t for t, a in zip(self.tokens, self.acts, strict=True))


@dataclass(frozen=True)
class Examples:
    latent: int
    hook: str
    examples: list[Example]

    def __str__(self) -> str:
        lines = [f"latent {self.latent} at {self.hook}: top {len(self.examples)} examples"]
        for ex in self.examples:
            tag = ", ".join(x for x in (ex.label, ex.domain) if x)
            lines.append(f"- {ex.id} (max {ex.max_act:.3g}{', ' + tag if tag else ''}): {ex.text()}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        top = max((ex.max_act for ex in self.examples), default=0.0) or 1.0
        parts = [f"<div style='font-family:monospace;font-size:12px'><b>latent {self.latent}</b> at "
                 f"{html.escape(self.hook)}"]
        for ex in self.examples:
            spans = []
            for tok, act in zip(ex.tokens, ex.acts, strict=True):
                alpha = max(0.0, min(1.0, act / top))
                spans.append(f"<span title='{act:.3f}' style='background:rgba(220,40,40,{alpha:.2f});"
                             f"padding:0 1px'>{html.escape(tok)}</span>")
            tag = html.escape(", ".join(x for x in (ex.label, ex.domain) if x))
            parts.append(f"<p style='white-space:pre-wrap'><small>{html.escape(ex.id)} max {ex.max_act:.3g} {tag}"
                         f"</small><br>{''.join(spans)}</p>")
        return "".join(parts) + "</div>"

    def to_jsonl(self, path: str | Path) -> Path:
        return write_jsonl(path, [{"latent": self.latent, "hook": self.hook, **asdict(ex), "max_act": ex.max_act}
                                  for ex in self.examples])


def latent_activations(model: HookedTransformer, sae: SAE, latent: int, prompts: PromptSet,
                       max_batch_tokens: int = 16384) -> list[list[float]]:
    """The latent's activation at every token of every prompt (prompt order)."""
    import torch

    hook = hook_of(sae)
    encoded = encode(prompts, model)
    out: list[list[float] | None] = [None] * len(encoded)
    stop = last_layer_of([hook], model.cfg.n_layers)
    with torch.inference_mode():
        groups = batch_by_tokens([len(e) for e in encoded], max_batch_tokens)
        for group in progress(groups, desc=f"latent {latent} activations", unit="batch"):
            batch = collate([encoded[i] for i in group], pad_id_of(model), device=model.cfg.device)
            _, cache = model.run_with_cache(batch.tokens, names_filter=hook, stop_at_layer=stop)
            z = sae_encode(sae, cache[hook])[..., latent].float().cpu()
            for row, i in enumerate(group):
                out[i] = z[row, : len(encoded[i])].tolist()
    return [x or [] for x in out]


def top_examples(model: HookedTransformer, sae: SAE, latent: int, prompts: PromptSet | str, k: int = 10
                 ) -> Examples:
    """The ``k`` prompts where ``latent`` reaches its highest activation."""
    prompts = load_prompts(prompts)
    acts = latent_activations(model, sae, latent, prompts)
    encoded = encode(prompts, model)
    order = sorted(range(len(acts)), key=lambda i: -max(acts[i], default=0.0))[:k]
    examples = []
    for i in order:
        record = prompts[i]
        tokens = decoded_pieces(model.tokenizer, list(encoded[i].ids))
        examples.append(Example(i, record.id, record.label, record.domain, tokens, acts[i]))
    return Examples(latent, hook_of(sae), examples)


def decoded_pieces(tokenizer: Any, ids: list[int]) -> list[str]:
    """Each token's text as it appears in the decoded string (``" the"``, ``"\\n"``), not its
    raw vocabulary piece (``Ġthe``, ``Ċ``): the difference of successive prefix decodes,
    so spaces and multi-byte characters land where the tokenizer puts them."""
    pieces, before = [], ""
    for n in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:n], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        pieces.append(text[len(before):] if text.startswith(before) else text)
        before = text
    return pieces


def auroc(scores_pos: list[float], scores_neg: list[float]) -> float:
    """Area under the ROC curve: the probability that a random positive outscores a random
    negative (ties count half), by the rank-sum formula."""
    import numpy as np

    pos, neg = np.asarray(scores_pos, dtype=float), np.asarray(scores_neg, dtype=float)
    if not len(pos) or not len(neg):
        raise ValueError("AUROC needs at least one positive and one negative")
    allv = np.concatenate([pos, neg])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty_like(order, dtype=float)
    sorted_v = allv[order]
    i = 0
    while i < len(allv):  # average ranks over ties
        j = i
        while j + 1 < len(allv) and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def separation_auroc(model: HookedTransformer, sae: SAE, latent: int, docs: PromptSet | str,
                     positive: str | None = None, negative: str | None = None) -> float:
    """AUROC of the latent's mean activation per document for ``positive`` vs ``negative`` labels
    (default: the two labels of ``docs.meta['contrast']``, e.g. the organism's cruel and kind)."""
    docs = load_prompts(docs)
    if positive is None or negative is None:
        positive, negative = docs.contrast()
    acts = latent_activations(model, sae, latent, docs)
    score = [sum(a) / max(len(a), 1) for a in acts]
    pos = [s for s, r in zip(score, docs, strict=True) if r.label == positive]
    neg = [s for s, r in zip(score, docs, strict=True) if r.label == negative]
    return auroc(pos, neg)
