"""Plain descriptions of a model and a prompt set (for ``misfeat inspect`` and notebooks)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from misfeat.data import PromptSet


def describe_model(model: HookedTransformer) -> dict[str, Any]:
    """Architecture, provenance and hook names of a loaded model."""
    from misfeat.data import chat_format_of
    from misfeat.models import dtype_name, fingerprint, model_info

    info = model_info(model)
    cfg = model.cfg
    n_params = sum(p.numel() for p in model.parameters())
    hooks = sorted(model.hook_dict)
    return {
        "spec": info.spec,
        "source": info.source,
        "path": info.path,
        "architecture": cfg.original_architecture or "HookedTransformer",
        "n_layers": cfg.n_layers,
        "d_model": cfg.d_model,
        "n_heads": cfg.n_heads,
        "d_mlp": cfg.d_mlp,
        "d_vocab": cfg.d_vocab,
        "n_ctx": cfg.n_ctx,
        "n_params": n_params,
        "dtype": dtype_name(cfg.dtype),
        "device": str(cfg.device),
        "chat_format": chat_format_of(model) if model.tokenizer is not None else None,
        "fingerprint": fingerprint(model),
        "residual_hooks": f"blocks.{{L}}.hook_resid_pre|mid|post, L = 0..{cfg.n_layers - 1} (block index)",
        "n_hooks": len(hooks),
        "hooks": hooks,
    }


def describe_prompts(prompts: PromptSet, model: HookedTransformer | None = None) -> dict[str, Any]:
    """Counts, domains, labels and (with a model) token-length statistics of a prompt set."""
    labels = sorted({r.label for r in prompts if r.label is not None})
    out: dict[str, Any] = {
        "name": prompts.name,
        "n": len(prompts),
        "hash": prompts.hash,
        "domains": ",".join(prompts.domains()),
        "labels": ",".join(labels),
        "with_response": sum(r.response is not None for r in prompts),
    }
    if model is not None:
        from misfeat.data import encode

        lengths = sorted(len(e) for e in encode(prompts, model))
        out.update(tokens=sum(lengths), min_len=lengths[0], median_len=lengths[len(lengths) // 2],
                   max_len=lengths[-1])
    return out
