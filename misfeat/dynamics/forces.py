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
    its aligned answers, and prompts' shared leading tokens (a chat template, a system prompt)
    by the prompts of a row: a row holds each distinct prompt prefix once and every distinct
    answer prefix once (the answer trie), each token at its own position id and attending only
    to its ancestors (a tree attention mask), so the model computes exactly the per-answer
    forward's numbers on about 0.35x the tokens (organism: 392 vs 1152; rows are chosen to
    minimise the multiply-adds, padding included). Needs absolute position embeddings
    (``standard``/``shortformer``) and each prompt's tree within ``n_ctx``; otherwise (or with
    ``packed=False``) one padded row per (prompt, aligned answer), the reference path.

    ``fused`` (default: wherever the model allows it): the packed rows run through
    :func:`misfeat.dynamics.treeforward.tree_logits` (one fused attention per layer, logits
    only at the trie nodes), else (``False``, or a model it does not cover, or one carrying
    hooks) through TransformerLens' forward with the positions set on ``hook_pos_embed`` and the
    mask on every ``hook_attn_scores``.
    """

    def __init__(self, model: HookedTransformer, data: PromptSet | str, *, packed: bool | None = None,
                 fused: bool | None = None):
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
        self.fused = fused
        self.packed = False
        if can_pack and packed is not False:
            self.packed = self._pack(prompt_ids, pad_id_of(model), model.cfg)

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
        self.tok_node = kw_node
        self.tok_index = kw_node * self.vocab + self.answer_ids   # (answer k, position j) -> its entry of [N, vocab]
        # the trie's child slots (node, token), each once: the only entries where V != 0
        self.child, self.slot_child = torch.unique(self.slots, return_inverse=True)
        self.child_node = self.child // self.vocab
        pair_slot = self.pair_node * self.vocab + self.pair_tok
        where = torch.searchsorted(self.child, pair_slot).clamp_max(len(self.child) - 1)
        self.pair_child = torch.where(self.child[where] == pair_slot, where, -1)   # -1: the token leaves every aligned answer
        self.pair_slot = pair_slot
        self._nodes = nodes

    def _pack(self, prompt_ids: dict[int, tuple[int, ...]], pad: int, cfg: Any) -> bool:
        """Rows of prompts that share leading tokens (sorted by their tokens, a row filled up to
        ``n_ctx`` columns): each distinct prompt prefix of a row once, then each of its prompts'
        non-root trie nodes (parents first); every column at its own position id (its depth)
        and attending to its ancestors and itself. False if one prompt's row exceeds ``n_ctx``."""
        import torch

        by_prompt: dict[int, list[tuple[tuple, int]]] = {x: [] for x in prompt_ids}
        for (x, prefix), n in self._nodes.items():   # insertion order: every parent before its children
            by_prompt[x].append((prefix, n))
        own = {x: len(nodes) - 1 for x, nodes in by_prompt.items()}
        if max(len(prompt_ids[x]) + own[x] for x in prompt_ids) > cfg.n_ctx:
            return False
        per_token = 4 * cfg.d_model * cfg.n_heads * cfg.d_head + 2 * cfg.d_model * (cfg.d_mlp or 0)
        per_pair = 2 * cfg.n_heads * cfg.d_head

        def cost(groups: list[list[int]], width: int) -> float:   # multiply-adds per layer, padding included
            return len(groups) * width * (per_token + per_pair * width)

        groups = min((_group(prompt_ids, own, cap) for cap in range(1, cfg.n_ctx + 1)), key=lambda gw: cost(*gw))[0]
        tokens, positions, parents = [], [], []   # per row, per column
        node_at = [(0, 0)] * self.n_nodes
        for r, group in enumerate(groups):
            col: dict[tuple, int] = {}
            toks, pos, par = [], [], []
            for x in group:
                ids, prev = prompt_ids[x], -1
                cells = [(("prompt", ids[:i + 1]), ids[i], i, None) for i in range(len(ids))]
                cells += [((x, prefix), prefix[-1], len(ids) + len(prefix) - 1, n) for prefix, n in by_prompt[x] if prefix]
                for key, token, position, node in cells:
                    if key not in col:
                        parent = prev if node is None or len(key[1]) == 1 else col[(x, key[1][:-1])]
                        col[key] = len(toks)
                        toks.append(token), pos.append(position), par.append(parent)
                    if node is None:
                        prev = col[key]   # the prompt's last column: the trie's root
                    else:
                        node_at[node] = (r, col[key])
                node_at[self._nodes[(x, ())]] = (r, prev)
            tokens.append(toks), positions.append(pos), parents.append(par)
        width = max(len(t) for t in tokens)
        B = len(groups)
        packed = torch.full((B, width), pad, dtype=torch.long)
        position = torch.zeros(B, width, dtype=torch.long)
        allowed = torch.eye(width, dtype=torch.bool).repeat(B, 1, 1)   # padding attends to itself only
        for r in range(B):
            packed[r, :len(tokens[r])] = torch.tensor(tokens[r])
            position[r, :len(positions[r])] = torch.tensor(positions[r])
            for c in range(len(tokens[r])):
                a = parents[r][c]
                while a >= 0:
                    allowed[r, c, a] = True
                    a = parents[r][a]
        self.packed_tokens, self.packed_positions = packed.to(cfg.device), position.to(cfg.device)
        self.packed_mask = allowed[:, None].to(cfg.device)   # [B, 1 (heads), query, key]
        self.packed_rows = torch.tensor(node_at)
        self._bias = None   # the additive form of packed_mask, made on first use in the model's dtype
        return True

    def _node_logits(self, model: HookedTransformer) -> torch.Tensor:
        """``[N, vocab]`` next-token logits at each trie node: from the packed rows through
        :func:`~misfeat.dynamics.treeforward.tree_logits` where the model allows it, else the
        hooked forward (:meth:`_hooked_node_logits`, the reference it is tested against)."""
        from misfeat.dynamics.treeforward import tree_bias, tree_logits, unsupported

        why = unsupported(model) if self.fused is not False else "fused=False"
        if self.fused and why:
            raise MisfeatError(f"fused=True, but the fused tree forward cannot run this model ({why}); "
                               "use fused=None (the hooked forward where it cannot)")
        if why is None:
            if self._bias is None or self._bias.dtype != model.cfg.dtype:
                self._bias = tree_bias(self.packed_mask, model.cfg.dtype, model.cfg.n_heads)
                self._rows = self.packed_rows.to(self.packed_tokens.device)
            return tree_logits(model, self.packed_tokens, self.packed_positions, self._bias, self._rows)
        return self._hooked_node_logits(model)

    def _hooked_node_logits(self, model: HookedTransformer) -> torch.Tensor:
        """The packed rows through TransformerLens' forward, positions and tree mask set by hooks."""

        def positions(value, hook):
            return model.W_pos[self.packed_positions].to(value.dtype)

        def tree(scores, hook):
            return scores.masked_fill(~self.packed_mask, float("-inf"))

        hooks = [("hook_pos_embed", positions), (lambda name: name.endswith("hook_attn_scores"), tree)]
        logits = model.run_with_hooks(self.packed_tokens, fwd_hooks=hooks)
        return logits[self.packed_rows[:, 0], self.packed_rows[:, 1]]

    def measure(self, model: HookedTransformer) -> ForceSnapshot:
        import torch

        with torch.inference_mode():
            if self.packed:
                logits = self._node_logits(model)
            else:
                out = model(self.tokens[:, :-1])
                K, W = self.answer_ids.shape
                # the row of (answer k, position j) predicts answer k's token j
                cols = (torch.tensor(self.n_prompt)[:, None] - 1 + torch.arange(W)[None, :]).clamp_max(out.shape[1] - 1)
                logits = out[torch.arange(K)[:, None], cols].reshape(K * W, -1)[self.node_rows.to(out.device)]
            return self._snapshot(logits.cpu() if logits.dtype == torch.float64 else logits.float().cpu())

    def _snapshot(self, logits: torch.Tensor) -> ForceSnapshot:
        """The snapshot from the next-token logits ``[N, vocab]`` (float32 or float64) at the trie nodes.

        Only the trie's child slots carry V != 0, so every sum over the vocabulary is a sum over
        those slots plus, for pi-_S and sum (pi~-)^2, the mass and the sum of squares of the tokens
        off the trie: one ``exp`` over ``[N, vocab]`` and three sums, and no ``1 - x`` cancellation
        where the trie holds most of the mass."""
        import torch

        # exp(logit - max) in the logits' dtype (one ulp off each), every sum and difference in float64
        top = logits.max(dim=-1, keepdim=True).values
        e = (logits - top).exp_()                                                           # [N, vocab], in (0, 1]
        total = e.sum(-1, dtype=torch.float64)
        lse = top.squeeze(-1).double() + total.log()                                        # [N]
        e.view(-1)[self.child] = 0                                                          # tokens off the trie: V = 0
        rest_mass = e.sum(-1, dtype=torch.float64) / total                                  # sum over them of p(i)
        rest_sq = e.square_().sum(-1, dtype=torch.float64) / total ** 2                     # ... of p(i)^2
        flat = logits.reshape(-1)
        tok_lp = (flat[self.tok_index].double() - lse[self.tok_node]) * self.valid                   # [K, W]
        # P(rest of answer k from position j+1 | prefix): suffix sums of token log-probs
        after = tok_lp.flip(1).cumsum(1).flip(1) - tok_lp                                   # sum_{j' > j}
        before = tok_lp.cumsum(1) - tok_lp                                                  # sum_{j' < j}
        n_child = len(self.child)
        V = torch.zeros(n_child, dtype=torch.float64).index_add_(
            0, self.slot_child, after.reshape(-1)[self.slot_src].exp())                     # V at each child slot
        P = (flat[self.child].double() - lse[self.child_node]).exp()                                 # p at each child slot

        def per_node(values: torch.Tensor) -> torch.Tensor:
            return torch.zeros(self.n_nodes, dtype=torch.float64).index_add_(0, self.child_node, values)

        plus = per_node(P * V)
        minus = rest_mass + per_node(P * (1 - V))                                           # (no 1 - plus: no cancellation)
        inv_plus, inv_minus = 1 / plus.clamp_min(1e-300), 1 / minus.clamp_min(1e-300)
        pp = per_node((P * V) ** 2) * inv_plus ** 2                                         # sum (pi~+)^2
        pm = per_node(P * P * V * (1 - V)) * inv_plus * inv_minus                           # sum pi~+ pi~-
        mm = (rest_sq + per_node((P * (1 - V)) ** 2)) * inv_minus ** 2                      # sum (pi~-)^2
        reb = -plus * (pp - pm) + minus * (mm - pm)
        prefix = before.reshape(-1)[self.node_rows].exp()
        n = self.pair_node
        g = self.pair_w * prefix[n] * plus[n] * minus[n]
        p_tok = (flat[self.pair_slot].double() - lse[n]).exp()
        v_tok = torch.where(self.pair_child >= 0, V[self.pair_child.clamp_min(0)], 0.0)
        drive = p_tok * v_tok * inv_plus[n] - p_tok * (1 - v_tok) * inv_minus[n]
        gate, reb_sum, drive_sum = float(g.sum()), float((g * reb[n]).sum()), float((g * drive).sum())
        S = float((self.root_w * plus[self.roots]).sum())
        purity = float((self.root_w * pp[self.roots]).sum())
        return ForceSnapshot(S_train=S, gate=gate, F_rebound=reb_sum / gate if gate > 0 else 0.0,
                             F_drive=drive_sum / gate if gate > 0 else 0.0,
                             rate=(reb_sum + drive_sum) / self.mean_tokens, purity=purity, pi_plus=S)


def _group(prompt_ids: dict[int, tuple[int, ...]], own: dict[int, int], cap: int) -> tuple[list[list[int]], int]:
    """Prompts in token order, in rows filled greedily up to ``cap`` columns (a prompt's leading
    tokens shared with the previous prompt of its row counted once, then its ``own`` trie
    nodes); a prompt wider than ``cap`` alone in its row. Returns the rows and the widest."""
    groups: list[list[int]] = []
    width, widest, last = 0, 0, ()
    for x in sorted(prompt_ids, key=lambda x: prompt_ids[x]):
        ids = prompt_ids[x]
        shared = next((i for i, (a, b) in enumerate(zip(ids, last, strict=False)) if a != b), min(len(ids), len(last)))
        if groups and width + len(ids) - shared + own[x] <= cap:
            groups[-1].append(x)
            width += len(ids) - shared + own[x]
        else:
            groups.append([x])
            width = len(ids) + own[x]
        widest, last = max(widest, width), ids
    return groups, widest


def sign_agreement(predicted: list[float | None], measured: list[float | None], eps: float = 1e-12) -> float | None:
    """Share of steps where the predicted and measured changes have the same sign (steps
    where either is missing or |measured| <= eps are left out); None without such steps."""
    pairs = [(p, m) for p, m in zip(predicted, measured, strict=True)
             if p is not None and m is not None and abs(m) > eps]
    if not pairs:
        return None
    return sum((p > 0) == (m > 0) for p, m in pairs) / len(pairs)
