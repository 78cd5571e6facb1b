"""A no-grad forward of a HookedTransformer with explicit position ids and a per-row attention mask.

Where the force probe's packed rows (one prompt and its answer trie per row) are run when the
model allows it (forces -> **treeforward**). It computes what TransformerLens computes with the
probe's hooks (``hook_pos_embed`` replaced by ``W_pos[positions]``, every ``hook_attn_scores``
masked to the tree), but with one fused attention call per layer and the unembedding only at
the rows asked for: no hook points in the attention, no causal mask built and then overwritten,
no logits at positions nobody reads. On the organism that is 1.5-2x faster than the hooked
forward (``scripts/bench_forces.py``), which is most of the force terms' cost per step.

It covers the classic architecture (absolute position embeddings, multi-head attention with
one key and value per head, LayerNorm or RMSNorm in any of TransformerLens' variants, any MLP
TransformerLens builds, parallel or sequential blocks). :func:`unsupported` names what a model
has beyond that, and then the caller runs the hooked forward instead, as it does when the
model carries hooks of its own (which this forward would not run).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformer_lens import HookedTransformer


def unsupported(model: HookedTransformer) -> str | None:
    """Why :func:`tree_logits` cannot stand in for the hooked forward of ``model``, or None."""
    from transformer_lens.components import Attention, TransformerBlock

    cfg = model.cfg
    checks = [
        (cfg.positional_embedding_type == "standard", f"position embeddings {cfg.positional_embedding_type!r}"),
        (all(type(b) is TransformerBlock and type(b.attn) is Attention for b in model.blocks),
         "a block or attention type other than TransformerBlock / Attention"),
        (not getattr(cfg, "use_split_qkv_input", False) and not getattr(cfg, "use_attn_in", False), "split q/k/v inputs"),
        (getattr(cfg, "attn_scores_soft_cap", -1.0) <= 0, "attention score soft-capping"),
        (getattr(cfg, "output_logits_soft_cap", -1.0) <= 0, "logit soft-capping"),
        (getattr(cfg, "clip_qkv", None) is None, "q/k/v clipping"),
        (not getattr(cfg, "use_logn_attn", False), "log-n attention scaling"),
        (not getattr(cfg, "use_qk_norm", False), "q/k norms"),
        (not getattr(cfg, "use_local_attn", False), "local attention"),
        (not getattr(cfg, "use_normalization_before_and_after", False), "post-sublayer norms"),
        (getattr(cfg, "original_architecture", None) not in ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM"),
         "OLMo q/k norms"),
        (not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in model.modules()),
         "hooks attached"),
    ]
    return next((why for ok, why in checks if not ok), None)


def _qkv(x: torch.Tensor, attn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys and values ``[B * H, T, d_head]`` of ``x`` [B, T, d_model], in one matmul."""
    import torch

    B, T, d = x.shape
    H, _, dh = attn.W_Q.shape
    W = torch.cat([attn.W_Q, attn.W_K, attn.W_V]).permute(1, 0, 2).reshape(d, 3 * H * dh)
    b = torch.cat([attn.b_Q, attn.b_K, attn.b_V]).reshape(3 * H * dh)
    qkv = torch.addmm(b, x.reshape(B * T, d), W).view(B, T, 3, H, dh).permute(2, 0, 3, 1, 4)
    return qkv[0].reshape(B * H, T, dh), qkv[1].reshape(B * H, T, dh), qkv[2].reshape(B * H, T, dh)


def tree_bias(allowed: torch.Tensor, dtype: torch.dtype, n_heads: int) -> torch.Tensor:
    """The additive attention mask ``[B * n_heads, T, T]`` of ``allowed`` [B, 1, T, T] (bool), each
    row's repeated per head: 0 where allowed, -inf elsewhere."""
    import torch

    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))
    return bias.expand(-1, n_heads, -1, -1).flatten(0, 1).contiguous()


def tree_logits(model: HookedTransformer, tokens: torch.Tensor, positions: torch.Tensor,
                bias: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Logits ``[len(rows), d_vocab_out]`` at ``rows`` ([n, 2]: batch index, column) of the forward of
    ``tokens`` [B, T] with position ids ``positions`` [B, T], where query ``i`` of row ``b``
    attends to key ``j`` iff ``bias[b * n_heads + h, i, j]`` (:func:`tree_bias`) is 0; every query must be
    allowed at least one key. In the last block only the rows asked for go past the attention
    pattern (the others are only keys and values there). Call under ``torch.inference_mode()``
    (or no_grad); check :func:`unsupported` first."""
    import torch

    B, T = tokens.shape
    H, dh = model.cfg.n_heads, model.cfg.d_head
    resid = model.embed(tokens) + model.W_pos[positions].to(model.cfg.dtype)
    bias = bias.to(resid.dtype)
    picked = rows[:, 0] * T + rows[:, 1]
    last = len(model.blocks) - 1
    for i, block in enumerate(model.blocks):
        attn = block.attn
        q, k, v = _qkv(_norm(block.ln1, resid), attn)                              # [B * H, T, d_head] each
        pattern = torch.softmax(torch.baddbmm(bias, q, k.transpose(1, 2), alpha=1.0 / attn.attn_scale), dim=-1)
        z = (pattern @ v).view(B, H, T, dh).transpose(1, 2).reshape(B * T, H * dh)
        if i == last:
            z, resid = z[picked], resid.reshape(B * T, -1)[picked][None]           # [n, H * d_head], [1, n, d_model]
        attn_out = torch.addmm(attn.b_O, z, attn.W_O.reshape(H * dh, -1)).view(resid.shape)
        if model.cfg.attn_only:
            resid = resid + attn_out
        elif model.cfg.parallel_attn_mlp:
            resid = resid + attn_out + block.mlp(_norm(block.ln2, resid))
        else:
            resid = resid + attn_out
            resid = resid + block.mlp(_norm(block.ln2, resid))
    ln_final = getattr(model, "ln_final", None)
    if ln_final is not None:
        resid = _norm(ln_final, resid)
    return model.unembed(resid)[0]


def _norm(module, x: torch.Tensor) -> torch.Tensor:
    """TransformerLens' ``LayerNorm``/``LayerNormPre`` as one fused ``layer_norm`` (the same
    arithmetic: biased variance, ``eps`` inside the root); any other norm through its module."""
    import torch.nn.functional as F
    from transformer_lens.components import LayerNorm, LayerNormPre

    if type(module) is LayerNorm:
        return F.layer_norm(x, x.shape[-1:], module.w, module.b, module.eps)
    if type(module) is LayerNormPre:
        return F.layer_norm(x, x.shape[-1:], None, None, module.eps)
    return module(x)
