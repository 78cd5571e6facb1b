"""The rebound and driving forces of Huang et al. 2026 (Theorem 2.9, SFT, K = I), exactly.

Where the dynamics protocols explain a measured change of S (scores -> **forces** -> runner).

For a prompt ``x`` whose aligned answers are enumerable, every quantity of the theorem
at an answer prefix ``u`` (position ``m``) follows from the next-token distribution
``p = pi(. | x, u)`` and the alignment potential of each child token
``v(i) = P((x, y) aligned | x, u, i)``:

    pi+_S = sum_i p(i) v(i)          pi-_S = 1 - pi+_S = sum_i p(i) (1 - v(i))
    pi~+  = p v / pi+_S              pi~-  = p (1 - v) / pi-_S      (outcome-conditioned next tokens)
    F_rebound = -pi+_S (pi~+ - pi~-) . pi~+  +  pi-_S (pi~- - pi~+) . pi~-     (main text, eq. 8)
    F_drive   = (pi~+ - pi~-) . p_target                                      (p_target one-hot)
    purity    = sum_i pi~+(i)^2

With K = I the logits move only at the training sequence's own prefixes, so the
predicted change is, per optimiser step of SGD on the mean response-token CE,

    dS ~ lr * E_{(x,y)~D} sum_m pi<_m pi+_S,m pi-_S,m (F_rebound + F_drive) / (mean response tokens)

Prefixes that no aligned answer starts with have pi+_S = 0 and contribute nothing, so
only the aligned answers need a forward: the same forward gives S on the training
prompts (the measured dS). (The appendix restatement, eqs. 26-27, flips the sign of the
second rebound term; we implement the main text, which the derivation from
pi = pi+ pi~+ + pi- pi~- confirms.)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from misfeat.data import PromptRecord, PromptSet, collate, encode, load_prompts, pad_id_of
from misfeat.errors import MisfeatError

if TYPE_CHECKING:
    import torch
    from transformer_lens import HookedTransformer


@dataclass(frozen=True)
class PositionForces:
    """Theorem 2.9's quantities at one prefix (tensors over the vocabulary where named ``~``)."""

    pi_plus: float
    pi_minus: float
    tilde_plus: Any
    tilde_minus: Any
    purity: float
    F_rebound: float
    F_drive: float | None


def position_forces(p: torch.Tensor, v: torch.Tensor, target: int | None = None) -> PositionForces:
    """The exact per-position quantities from ``p`` [vocab] (next-token distribution) and ``v``
    [vocab] (P(aligned | prefix + token), 0 for tokens that leave every aligned answer);
    ``target`` the one-hot training token (F_drive), or None."""
    p, v = p.double(), v.double()
    plus, minus = float((p * v).sum()), float((p * (1 - v)).sum())
    tp = p * v / plus if plus > 0 else p * 0
    tm = p * (1 - v) / minus if minus > 0 else p * 0
    reb = -plus * float((tp - tm) @ tp) + minus * float((tm - tp) @ tm)
    drive = None if target is None else float(tp[target] - tm[target])
    return PositionForces(plus, minus, tp, tm, float((tp * tp).sum()), reb, drive)


@dataclass(frozen=True)
class ForceSnapshot:
    """The forces at one model state, over the training data ``D``.

    ``S_train``: S on D's prompts (weighted as in D); ``gate`` = E_D sum_m pi< pi+ pi-;
    ``F_rebound``/``F_drive``: their gate-weighted means; ``rate`` = gate (F_rebound +
    F_drive) / mean response tokens: the predicted dS per unit learning rate; ``purity``:
    E_D sum(pi~+)^2 at the first answer position; ``pi_plus``: E_D pi+_S there (= S_train).
    """

    S_train: float
    gate: float
    F_rebound: float
    F_drive: float
    rate: float
    purity: float
    pi_plus: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _prompt_key(record: PromptRecord) -> tuple:
    return (record.prompt, record.messages)


class ForceProbe:
    """Computes a :class:`ForceSnapshot` of ``model`` on the training data ``data`` (records with
    a ``response`` and an ``extra['aligned']`` answer list), in one no-grad forward. Tokenised
    once at construction.

    ``packed`` (default: wherever the model allows it): each prompt's forward is shared by all
    its aligned answers: one row per prompt holds the prompt and every distinct answer prefix
    once (the answer trie), each trie token at its own position id and attending only to the
    prompt and its ancestors (a tree attention mask on ``hook_attn_scores``, the positions on
    ``hook_pos_embed``), so the model computes exactly the per-answer forward's numbers on
    about 0.4x the tokens (organism: 444 vs 1152). Needs absolute position embeddings
    (``standard``/``shortformer``) and the packed row within ``n_ctx``; otherwise (or with
    ``packed=False``) one padded row per (prompt, aligned answer), the reference path.
    """

    def __init__(self, model: HookedTransformer, data: PromptSet | str, *, packed: bool | None = None):
        data = load_prompts(data)
        missing = [r.id for r in data if not r.extra.get("aligned") or r.response is None]
        if missing:
            raise MisfeatError(f"force terms need a 'response' and an 'aligned' answer list on every training "
                               f"record; {len(missing)} of {len(data)} lack them (first {missing[0]!r})")
        keys: dict[tuple, int] = {}
        prompts: list[PromptRecord] = []
        for r in data:
            if _prompt_key(r) not in keys:
                keys[_prompt_key(r)] = len(prompts)
                prompts.append(r)
        pairs: dict[tuple[int, tuple[int, ...]], int] = {}
        for r, e in zip(data, encode(data, model), strict=True):
            key = (keys[_prompt_key(r)], tuple(e.ids[e.n_prompt:]))
            pairs[key] = pairs.get(key, 0) + 1
        self.pairs = [(x, y, c / len(data)) for (x, y), c in pairs.items()]
        self.prompt_weight = [0.0] * len(prompts)
        for x, _, w in self.pairs:
            self.prompt_weight[x] += w
        self.mean_tokens = sum(w * len(y) for _, y, w in self.pairs)
        expanded, owner = [], []
        for i, r in enumerate(prompts):
            for a in r.extra["aligned"]:
                expanded.append(r.with_response(a))
                owner.append(i)
        enc = encode(PromptSet(data.name, tuple(expanded), data.meta), model)
        answers = [tuple(e.ids[e.n_prompt:]) for e in enc]
        self.tokens = collate(enc, pad_id_of(model), "right", device=model.cfg.device).tokens
        self.n_prompt = [e.n_prompt for e in enc]
        self.width = max(len(a) for a in answers)
        self.vocab = model.cfg.d_vocab
        self._build_trie(answers, owner, keys_n=len(prompts))
        prompt_ids: dict[int, tuple[int, ...]] = {}
        same_prompt = all(prompt_ids.setdefault(o, tuple(e.ids[:e.n_prompt])) == tuple(e.ids[:e.n_prompt])
                          for o, e in zip(owner, enc, strict=True))
        can_pack = same_prompt and model.cfg.positional_embedding_type in ("standard", "shortformer")
        if packed and not can_pack:
            raise MisfeatError("packed=True needs absolute position embeddings (standard or shortformer) and one "
                               f"tokenisation per prompt; this model has {model.cfg.positional_embedding_type!r}: "
                               "use packed=None (falls back to one forward per answer)")
        self.packed = False
        if can_pack and packed is not False:
            self.packed = self._pack(prompt_ids, pad_id_of(model), model.cfg.n_ctx, model.cfg.device)

    def _build_trie(self, answers: list[tuple[int, ...]], owner: list[int], keys_n: int) -> None:
        """The aligned-answer trie of each prompt (fixed by the tokens; the model gives the numbers):
        node ``(prompt, prefix)``, the (answer, position) row that predicts from it, and for every
        (answer, position) the (node, child token) slot its completion probability adds to."""
        import torch

        nodes: dict[tuple, int] = {}
        node_rows, slots, slot_src = [], [], []
        for k, a in enumerate(answers):
            for j in range(len(a)):
                key = (owner[k], a[:j])
                if key not in nodes:
                    nodes[key] = len(node_rows)
                    node_rows.append(k * self.width + j)
                slots.append(nodes[key] * self.vocab + a[j])
                slot_src.append(k * self.width + j)
        w, n, t = [], [], []
        for x, y, weight in self.pairs:
            for m in range(len(y)):
                node = nodes.get((x, y[:m]))
                if node is None:
                    break  # no aligned answer starts with this prefix: pi+ = 0 here and below
                w.append(weight)
                n.append(node)
                t.append(y[m])
        self.n_nodes = len(node_rows)
        self.node_rows = torch.tensor(node_rows)
        self.slots, self.slot_src = torch.tensor(slots), torch.tensor(slot_src)
        self.pair_w = torch.tensor(w, dtype=torch.float64)
        self.pair_node, self.pair_tok = torch.tensor(n, dtype=torch.long), torch.tensor(t, dtype=torch.long)
        self.roots = torch.tensor([nodes[(x, ())] for x in range(keys_n)])
        self.root_w = torch.tensor(self.prompt_weight, dtype=torch.float64)
        lengths = torch.tensor([len(a) for a in answers])
        self.valid = torch.arange(self.width)[None, :] < lengths[:, None]
        self.answer_ids = torch.tensor([list(a) + [0] * (self.width - len(a)) for a in answers])
        kw_node = torch.zeros(len(answers), self.width, dtype=torch.long)
        for k, a in enumerate(answers):
            for j in range(len(a)):
                kw_node[k, j] = nodes[(owner[k], a[:j])]
        self.tok_index = kw_node * self.vocab + self.answer_ids   # (answer k, position j) -> its entry of [N, vocab]
        self._nodes = nodes

    def _pack(self, prompt_ids: dict[int, tuple[int, ...]], pad: int, n_ctx: int, device) -> bool:
        """One row per prompt: its tokens, then each non-root trie node's last token (parents
        first), with position ids and the tree mask; False if a row would exceed ``n_ctx``."""
        import torch

        rows = {x: list(ids) for x, ids in prompt_ids.items()}
        pos = {x: list(range(len(ids))) for x, ids in prompt_ids.items()}
        col: dict[tuple, int] = {}
        parents: dict[tuple, tuple] = {}
        node_at = [(0, 0)] * self.n_nodes
        for (x, prefix), n in self._nodes.items():   # insertion order: every parent before its children
            if prefix:
                col[(x, prefix)] = len(rows[x])
                parents[(x, prefix)] = (x, prefix[:-1])
                rows[x].append(prefix[-1])
                pos[x].append(len(prompt_ids[x]) + len(prefix) - 1)
                node_at[n] = (x, col[(x, prefix)])
            else:
                node_at[n] = (x, len(prompt_ids[x]) - 1)
        width = max(len(r) for r in rows.values())
        if width > n_ctx:
            return False
        B = len(rows)
        tokens = torch.full((B, width), pad, dtype=torch.long)
        positions = torch.zeros(B, width, dtype=torch.long)
        allowed = torch.eye(width, dtype=torch.bool).repeat(B, 1, 1)   # padding attends to itself only
        for x in range(B):
            n_p = len(prompt_ids[x])
            tokens[x, :len(rows[x])] = torch.tensor(rows[x])
            positions[x, :len(pos[x])] = torch.tensor(pos[x])
            allowed[x, :len(rows[x]), :n_p] = torch.ones(len(rows[x]), n_p, dtype=torch.bool).tril()
        for key, c in col.items():
            x, node = key[0], key
            while node[1]:
                allowed[x, c, col[node]] = True
                node = parents[node]
        self.packed_tokens, self.packed_positions = tokens.to(device), positions.to(device)
        self.packed_mask = allowed[:, None].to(device)   # [B, 1 (heads), query, key]
        self.packed_rows = torch.tensor(node_at)
        return True

    def _packed_logprobs(self, model: HookedTransformer) -> torch.Tensor:
        """``[N, vocab]`` log-softmax of the next-token logits at each trie node, from the packed rows."""
        import torch

        def positions(value, hook):
            return model.W_pos[self.packed_positions].to(value.dtype)

        def tree(scores, hook):
            return scores.masked_fill(~self.packed_mask, float("-inf"))

        hooks = [("hook_pos_embed", positions), (lambda name: name.endswith("hook_attn_scores"), tree)]
        logits = model.run_with_hooks(self.packed_tokens, fwd_hooks=hooks)
        node_logits = logits[self.packed_rows[:, 0], self.packed_rows[:, 1]]
        return torch.log_softmax(node_logits.double(), dim=-1)

    def measure(self, model: HookedTransformer) -> ForceSnapshot:
        import torch

        K, W = self.answer_ids.shape
        with torch.inference_mode():
            if self.packed:
                node_lp = self._packed_logprobs(model)                                          # [N, vocab]
                tok_lp = node_lp.reshape(-1)[self.tok_index] * self.valid                        # [K, W]
            else:
                logits = model(self.tokens[:, :-1])
                # the row of (answer k, position j) predicts answer k's token j
                cols = (torch.tensor(self.n_prompt)[:, None] - 1 + torch.arange(W)[None, :]).clamp_max(logits.shape[1] - 1)
                rows = torch.log_softmax(logits[torch.arange(K)[:, None], cols].double(), dim=-1)  # [K, W, vocab]
                tok_lp = rows.gather(-1, self.answer_ids[..., None]).squeeze(-1) * self.valid      # [K, W]
                node_lp = rows.reshape(K * W, -1)[self.node_rows]
            return self._snapshot(node_lp, tok_lp)

    def _snapshot(self, node_lp: torch.Tensor, tok_lp: torch.Tensor) -> ForceSnapshot:
        """The snapshot from the log-probabilities at the trie nodes and of each answer token."""
        import torch

        # P(rest of answer k from position j+1 | prefix): suffix sums of token log-probs
        after = tok_lp.flip(1).cumsum(1).flip(1) - tok_lp                                   # sum_{j' > j}
        before = tok_lp.cumsum(1) - tok_lp                                                  # sum_{j' < j}
        P = node_lp.exp()                                                                   # [N, vocab]
        Vc = torch.zeros(self.n_nodes * self.vocab, dtype=torch.float64)
        Vc.index_add_(0, self.slots, after.reshape(-1)[self.slot_src].exp())
        Vc = Vc.view(self.n_nodes, self.vocab)
        plus, minus = (P * Vc).sum(-1), (P * (1 - Vc)).sum(-1)
        tp = P * Vc / plus.clamp_min(1e-300)[:, None]
        tm = P * (1 - Vc) / minus.clamp_min(1e-300)[:, None]
        pp, mm, pm = (tp * tp).sum(-1), (tm * tm).sum(-1), (tp * tm).sum(-1)
        reb = -plus * (pp - pm) + minus * (mm - pm)
        prefix = before.reshape(-1)[self.node_rows].exp()
        n = self.pair_node
        g = self.pair_w * prefix[n] * plus[n] * minus[n]
        drive = tp[n, self.pair_tok] - tm[n, self.pair_tok]
        gate, reb_sum, drive_sum = float(g.sum()), float((g * reb[n]).sum()), float((g * drive).sum())
        S = float((self.root_w * plus[self.roots]).sum())
        purity = float((self.root_w * pp[self.roots]).sum())
        return ForceSnapshot(S_train=S, gate=gate, F_rebound=reb_sum / gate if gate > 0 else 0.0,
                             F_drive=drive_sum / gate if gate > 0 else 0.0,
                             rate=(reb_sum + drive_sum) / self.mean_tokens, purity=purity, pi_plus=S)


def sign_agreement(predicted: list[float | None], measured: list[float | None], eps: float = 1e-12) -> float | None:
    """Share of steps where the predicted and measured changes have the same sign (steps
    where either is missing or |measured| <= eps are left out); None without such steps."""
    pairs = [(p, m) for p, m in zip(predicted, measured, strict=True)
             if p is not None and m is not None and abs(m) > eps]
    if not pairs:
        return None
    return sum((p > 0) == (m > 0) for p, m in pairs) / len(pairs)
