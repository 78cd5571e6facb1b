"""In-training defences against emergent misalignment (Kaczer et al. 2025, arXiv 2508.06249;
Chen et al. 2025, arXiv 2507.21509), as :class:`~misfeat.finetune.engine.Defence`\\ s.

- :class:`KL`: lambda * reverse KL(p_theta || p_ref), full vocabulary, mean over non-pad tokens.
- :class:`LDIFS`: lambda * ||phi_theta(x) - phi_ref(x)||^2, phi = per-layer L2-normalised
  residual features (all real positions of an example flattened), mean over the batch.
- :class:`PreventativeSteering`: add alpha * v at hooks in the training forward only;
  :meth:`PreventativeSteering.multilayer` adds the increments v_l - v_{l-1}.
- :class:`CAFT`: project the unit direction out in the training forward only.
- :class:`Inoculation`: a prefix or system turn on the training prompts only.
- :class:`Interleave` (in :mod:`misfeat.finetune.interleave`): mix a safe pool into the data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from misfeat.errors import MisfeatError
from misfeat.finetune.engine import Defence, Forward

if TYPE_CHECKING:
    import torch
    from transformer_lens import HookedTransformer

    from misfeat.data import PromptSet


def reverse_kl(logits: torch.Tensor, ref_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over ``mask`` positions of KL(p || q) = sum_v p (log p - log q), p = softmax(logits),
    q = softmax(ref_logits); ``logits [b, t, V]``, ``mask [b, t]`` bool."""
    import torch

    logp = torch.log_softmax(logits[mask].float(), -1)
    logq = torch.log_softmax(ref_logits[mask].float(), -1)
    return (logp.exp() * (logp - logq)).sum(-1).mean()


def ldifs_distance(acts: dict[str, torch.Tensor], ref_acts: dict[str, torch.Tensor], mask: torch.Tensor,
                   hooks: Sequence[str]) -> torch.Tensor:
    """Mean over examples of sum_l ||f_l - g_l||^2, f_l = normalize(flatten(acts[l][b] at ``mask[b]``))
    (pad positions zeroed before flattening, so they add nothing)."""
    import torch.nn.functional as F

    total = 0
    keep = mask[..., None].float()
    for hook in hooks:
        f = F.normalize((acts[hook].float() * keep).flatten(1), dim=-1)
        g = F.normalize((ref_acts[hook].float() * keep).flatten(1), dim=-1)
        total = total + ((f - g) ** 2).sum(-1)
    return total.mean()


def _check_reference(model: HookedTransformer, reference: HookedTransformer, what: str) -> None:
    if reference is model:
        raise MisfeatError(f"{what}: the reference must be a frozen copy, not the model being trained")
    if str(reference.cfg.device) != str(model.cfg.device):
        raise MisfeatError(f"{what}: the reference model is on {reference.cfg.device} but the trained model on "
                           f"{model.cfg.device}; load both on one device")
    if reference.cfg.d_vocab != model.cfg.d_vocab:
        raise MisfeatError(f"{what}: the reference model's vocabulary ({reference.cfg.d_vocab}) differs from the "
                           f"trained model's ({model.cfg.d_vocab}); use a reference with the same tokenizer")
    tok, ref_tok = model.tokenizer, reference.tokenizer
    if tok is not None and ref_tok is not None and tok.get_vocab() != ref_tok.get_vocab():
        raise MisfeatError(f"{what}: the reference model's tokenizer maps tokens differently; use a reference "
                           "with the same tokenizer")


def _check_weight(weight: float, what: str) -> None:
    if not weight >= 0:
        raise MisfeatError(f"{what}: lambda must be >= 0, got {weight}")


@dataclass(eq=False)
class KL(Defence):
    """``weight * KL(p_theta || p_ref)`` per token over the full vocabulary, averaged over the
    non-pad input tokens (prompt included, as the co-author code), or the positions that
    predict response tokens with ``response_only``. Paper: weight 0.1."""

    reference: Any
    weight: float = 0.1
    response_only: bool = False
    name: str = "kl"

    def __post_init__(self) -> None:
        _check_weight(self.weight, "KL")
        self.reference.eval()
        for p in self.reference.parameters():
            p.requires_grad_(False)

    def check(self, model):
        _check_reference(model, self.reference, "KL")

    def penalty(self, model, fwd: Forward):
        ref_logits, _ = fwd.reference[id(self.reference)]
        mask = fwd.batch.loss_mask[:, 1:] if self.response_only else fwd.masks()["all"]
        return self.weight * reverse_kl(fwd.logits, ref_logits, mask)

    def describe(self):
        from misfeat.models import fingerprint

        return {"name": self.name, "kind": "kl", "weight": self.weight, "response_only": self.response_only,
                "reference": fingerprint(self.reference)}


@dataclass(eq=False)
class LDIFS(Defence):
    """``weight * ||phi_theta(x) - phi_ref(x)||^2`` at ``layers`` (block indices -> resid_post, or
    hook names; explicit, e.g. every 5th layer). ``detached=True`` reproduces the public
    implementation that extracts features under no_grad: the value is logged, no gradient flows."""

    reference: Any
    layers: Sequence[int | str] = (0,)
    weight: float = 1.0
    detached: bool = False
    name: str = "ldifs"

    def __post_init__(self) -> None:
        _check_weight(self.weight, "LDIFS")
        if not len(self.layers):
            raise MisfeatError("LDIFS needs at least one layer")
        self.reference.eval()
        for p in self.reference.parameters():
            p.requires_grad_(False)

    def hooks(self, model):
        from misfeat.hooks import check_hooks

        names = [f"blocks.{x}.hook_resid_post" if isinstance(x, int) else x for x in self.layers]
        return check_hooks(model, names)

    def check(self, model):
        _check_reference(model, self.reference, "LDIFS")
        self.hooks(model)
        for hook in self.hooks(model):
            if hook not in self.reference.hook_dict:
                raise MisfeatError(f"LDIFS: the reference model has no hook {hook}")

    def penalty(self, model, fwd: Forward):
        hooks = self.hooks(model)
        _, ref_acts = fwd.reference[id(self.reference)]
        acts = {h: fwd.acts[h].detach() for h in hooks} if self.detached else fwd.acts
        return self.weight * ldifs_distance(acts, ref_acts, fwd.masks()["all"], hooks)

    def describe(self):
        from misfeat.models import fingerprint

        return {"name": self.name, "kind": "ldifs", "weight": self.weight, "layers": list(self.layers),
                "detached": self.detached, "reference": fingerprint(self.reference)}


def _vector_fingerprint(v: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(v.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


@dataclass(eq=False)
class PreventativeSteering(Defence):
    """Add ``alpha * vectors[i]`` at ``hooks[i]`` in the training forward only (hooks are removed
    after every step: evaluation and the saved model never see them). ``positions``: all,
    prompt, response or last. ``vectors``: ``[d]`` (every hook) or ``[len(hooks), d]``."""

    vectors: Any
    sites: Sequence[str] = ("blocks.0.hook_resid_post",)
    alpha: float = 1.0
    positions: str = "all"
    name: str = "steer"
    incremental: bool = field(default=False, repr=False)

    @classmethod
    def multilayer(cls, vectors: torch.Tensor, hooks: Sequence[str], alpha: float = 1.0,
                   positions: str = "all", name: str = "steer_multilayer") -> PreventativeSteering:
        """Chen App. J.3: at hook l add alpha * (v_l - v_{l-1}) (v_{-1} = 0), so the residual
        after layer l carries alpha * v_l in total."""
        if vectors.dim() != 2 or vectors.shape[0] != len(hooks):
            raise MisfeatError(f"multilayer steering needs one vector per hook: got {tuple(vectors.shape)} for "
                               f"{len(hooks)} hooks")
        import torch

        increments = vectors - torch.cat([torch.zeros_like(vectors[:1]), vectors[:-1]])
        return cls(increments, tuple(hooks), alpha, positions, name, incremental=True)

    def _per_hook(self) -> list[torch.Tensor]:
        v = self.vectors
        return [v] * len(self.sites) if v.dim() == 1 else list(v)

    def check(self, model):
        from misfeat.hooks import check_hooks
        from misfeat.interventions import _check_positions

        _check_positions(self.positions)
        check_hooks(model, list(self.sites))
        if self.vectors.dim() == 2 and self.vectors.shape[0] != len(self.sites):
            raise MisfeatError(f"{self.name}: {self.vectors.shape[0]} vectors for {len(self.sites)} hooks")
        for i in self.interventions(model):
            i.check(model)

    def interventions(self, model):
        from misfeat.interventions import Add

        return [Add(h, v, self.alpha, self.positions) for h, v in zip(self.sites, self._per_hook(), strict=True)]

    def describe(self):
        return {"name": self.name, "kind": "steer", "hooks": list(self.sites), "alpha": self.alpha,
                "positions": self.positions, "incremental": self.incremental,
                "norm": float(self.vectors.float().norm()), "vector": _vector_fingerprint(self.vectors)}


@dataclass(eq=False)
class CAFT(Defence):
    """Project the unit ``direction`` out of the activations at ``hooks`` in the training forward
    only (concept-ablation fine-tuning, Chen App. J.4)."""

    direction: Any
    sites: Sequence[str] = ("blocks.0.hook_resid_post",)
    positions: str = "all"
    name: str = "caft"

    def check(self, model):
        from misfeat.hooks import check_hooks

        check_hooks(model, list(self.sites))
        for i in self.interventions(model):
            i.check(model)

    def interventions(self, model):
        from misfeat.interventions import Ablate

        return [Ablate(list(self.sites), self.direction, None, self.positions)]

    def describe(self):
        return {"name": self.name, "kind": "caft", "hooks": list(self.sites), "positions": self.positions,
                "vector": _vector_fingerprint(self.direction)}


@dataclass(eq=False)
class Inoculation(Defence):
    """Put ``text`` before every training prompt (``mode='prefix'``: "text prompt"; ``'system'``: a
    system turn first). Evaluation prompts are untouched."""

    text: str
    mode: str = "prefix"
    name: str = "inoculation"

    def __post_init__(self) -> None:
        if self.mode not in ("prefix", "system"):
            raise MisfeatError(f"Inoculation mode must be prefix or system, got {self.mode!r}")
        if not self.text.strip():
            raise MisfeatError("Inoculation needs a non-empty text")

    def transform_data(self, data: PromptSet, model) -> PromptSet:
        import dataclasses

        from misfeat.data import PromptSet

        def inoculate(r):
            turns = r.messages if r.messages is not None else (("user", r.prompt or ""),)
            if self.mode == "system":
                return dataclasses.replace(r, prompt=None, messages=(("system", self.text), *turns))
            if r.messages is None:
                return dataclasses.replace(r, prompt=f"{self.text} {r.prompt or ''}".strip())
            i = next((k for k, (role, _) in enumerate(turns) if role == "user"), 0)
            role, content = turns[i]
            new = (*turns[:i], (role, f"{self.text} {content}".strip()), *turns[i + 1:])
            return dataclasses.replace(r, messages=new)

        return PromptSet(f"{data.name}+inoculation", tuple(inoculate(r) for r in data), data.meta)

    def describe(self):
        return {"name": self.name, "kind": "inoculation", "text": self.text, "mode": self.mode}


@dataclass(eq=False)
class TrainingInterventions(Defence):
    """Any misfeat interventions kept active in the training forward (realign's ``interventions``)."""

    operators: Sequence[Any] = ()
    name: str = "interventions"

    def check(self, model):
        for op in self.operators:
            op.check(model)

    def interventions(self, model):
        return list(self.operators)

    def describe(self):
        return {"name": self.name, "kind": "interventions", "operators": [op.describe() for op in self.operators]}
