"""Export a model that came from a Hugging Face directory back to one.

:func:`export_hf` inverts TransformerLens's weight conversion for Llama, Mistral, Qwen2, Gemma,
Gemma 2, GPT-NeoX and GPT-2, for a model loaded from a local directory or a misfeat checkpoint
of one (e.g. a realigned model: the original ``config.json`` travels in its metadata). The
directory loads with ``AutoModelForCausalLM.from_pretrained`` and its logits equal misfeat's.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from misfeat.hf import EXPORTABLE, GEMMA_ARCHITECTURES, HFLoadError

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


def export_hf(model: HookedTransformer, out_dir: str | os.PathLike, hf_config: dict[str, Any] | None = None,
              generation_config: dict[str, Any] | None = None) -> Path:
    """Write ``model`` as a Hugging Face directory (config.json, safetensors, tokenizer).

    ``hf_config`` defaults to the ``config.json`` the model was loaded from (kept in its
    metadata, also through misfeat checkpoints such as a realigned model). Raises
    :class:`HFLoadError` for models with no Hugging Face origin, or weights a Hugging Face
    model of that architecture cannot hold (e.g. trained biases where it has none).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from misfeat.models import dtype_name, model_info

    meta = model_info(model).meta
    hf_config = dict(hf_config or meta.get("hf_config") or {})
    if not hf_config:
        raise HFLoadError("export to Hugging Face needs the model's Hugging Face config.json; this model was not "
                          "loaded from a Hugging Face directory (or a misfeat checkpoint of one)")
    arch = hf_config["architectures"][0]
    if arch not in EXPORTABLE:
        raise HFLoadError(f"export of {arch} is not implemented; exportable: {', '.join(EXPORTABLE)}")
    if model.cfg.normalization_type in ("LNPre", "RMSPre"):
        raise HFLoadError("the model was loaded with process_weights=True (folded layer norms); load it "
                          "without processing to export it")
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    hf_state = _to_hf_state(state, model.cfg, arch)
    tied = hf_config.get("tie_word_embeddings", arch in GEMMA_ARCHITECTURES)
    head = hf_state.get("lm_head.weight")
    embed = next(v for k, v in hf_state.items() if k.endswith(("embed_tokens.weight", "wte.weight", "embed_in.weight")))
    if tied and head is not None and not torch.allclose(head, embed, atol=1e-6):
        hf_config["tie_word_embeddings"] = False  # fine-tuning untied them
    hf_config["torch_dtype"] = dtype_name(model.cfg.dtype)
    hf_config.pop("dtype", None)
    config = AutoConfig.for_model(**{k: v for k, v in hf_config.items() if k != "transformers_version"})
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    expected = set(skeleton.state_dict())
    hf_state = {k: v for k, v in hf_state.items() if k in expected}
    missing = sorted(set(dict(skeleton.named_parameters())) - set(hf_state))
    if missing:
        raise HFLoadError(f"export of {arch}: no weights for {missing[:5]}")
    hf_model = AutoModelForCausalLM.from_config(config, dtype=model.cfg.dtype)
    hf_model.load_state_dict({k: v.to(model.cfg.dtype) for k, v in hf_state.items()}, strict=False)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(str(out))
    if generation_config or meta.get("hf_generation_config"):
        (out / "generation_config.json").write_text(
            json.dumps(generation_config or meta["hf_generation_config"], indent=2))
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(str(out))
    return out


_ABSENT = {  # TransformerLens parameter suffixes with no Hugging Face counterpart, per architecture
    "bias-free": ("attn.b_Q", "attn.b_K", "attn._b_K", "attn.b_V", "attn._b_V", "attn.b_O", "mlp.b_in",
                  "mlp.b_out", "unembed.b_U"),
    "Qwen2ForCausalLM": ("attn.b_O", "mlp.b_in", "mlp.b_out", "unembed.b_U"),
    "GPTNeoXForCausalLM": ("unembed.b_U",),
    "GPT2LMHeadModel": ("unembed.b_U",),
}


def absent_in_hf(model: HookedTransformer) -> set[str]:
    """Names of ``model``'s parameters its Hugging Face architecture does not have (empty for
    models that did not come from a Hugging Face directory): fine-tuning leaves them at zero."""
    config = model_meta(model).get("hf_config") or {}
    arch = (config.get("architectures") or [None])[0]
    if arch is None:
        return set()
    suffixes = _ABSENT.get(arch, _ABSENT["bias-free"] if arch in EXPORTABLE else ())
    return {n for n, _ in model.named_parameters() if n.endswith(suffixes)}


def model_meta(model: HookedTransformer) -> dict[str, Any]:
    from misfeat.models import model_info

    return model_info(model).meta


def _dropped(state: dict, name: str, arch: str) -> None:
    tensor = state.get(name)
    if tensor is not None and tensor.abs().max() > 0:
        raise HFLoadError(f"export of {arch}: {name} is non-zero but {arch} has no such parameter "
                          "(freeze it during fine-tuning, or export as a misfeat checkpoint)")


def _get(state: dict, layer: int, name: str):
    block = f"blocks.{layer}.attn."
    return state[block + name] if block + name in state else state[block + "_" + name]


def _to_hf_state(state: dict, cfg: Any, arch: str) -> dict:
    import einops

    out: dict = {}
    for layer in range(cfg.n_layers):
        b = f"blocks.{layer}."
        q, k, v = (_get(state, layer, w) for w in ("W_Q", "W_K", "W_V"))
        bq, bk, bv = (_get(state, layer, w) for w in ("b_Q", "b_K", "b_V"))
        w_o = einops.rearrange(state[b + "attn.W_O"], "n h m -> m (n h)")
        if arch in GPT_LIKE:
            out.update(_gpt_block(state, arch, layer, q, k, v, bq, bk, bv, w_o))
            continue
        p = f"model.layers.{layer}."
        out[p + "self_attn.q_proj.weight"] = einops.rearrange(q, "n m h -> (n h) m")
        out[p + "self_attn.k_proj.weight"] = einops.rearrange(k, "n m h -> (n h) m")
        out[p + "self_attn.v_proj.weight"] = einops.rearrange(v, "n m h -> (n h) m")
        if arch == "Qwen2ForCausalLM":
            out[p + "self_attn.q_proj.bias"] = bq.reshape(-1)
            out[p + "self_attn.k_proj.bias"] = bk.reshape(-1)
            out[p + "self_attn.v_proj.bias"] = bv.reshape(-1)
        else:
            for name in ("b_Q", "_b_K", "_b_V", "b_K", "b_V"):
                _dropped(state, b + "attn." + name, arch)
        out[p + "self_attn.o_proj.weight"] = w_o
        for name in ("attn.b_O", "mlp.b_in", "mlp.b_out"):
            _dropped(state, b + name, arch)
        out[p + "mlp.up_proj.weight"] = state[b + "mlp.W_in"].T
        out[p + "mlp.gate_proj.weight"] = state[b + "mlp.W_gate"].T
        out[p + "mlp.down_proj.weight"] = state[b + "mlp.W_out"].T
        norm = (lambda w: w - 1.0) if arch in GEMMA_ARCHITECTURES else (lambda w: w)
        out[p + "input_layernorm.weight"] = norm(state[b + "ln1.w"])
        if arch == "Gemma2ForCausalLM":
            out[p + "post_attention_layernorm.weight"] = norm(state[b + "ln1_post.w"])
            out[p + "pre_feedforward_layernorm.weight"] = norm(state[b + "ln2.w"])
            out[p + "post_feedforward_layernorm.weight"] = norm(state[b + "ln2_post.w"])
        else:
            out[p + "post_attention_layernorm.weight"] = norm(state[b + "ln2.w"])
    _dropped(state, "unembed.b_U", arch)
    if arch in GPT_LIKE:
        out.update(_gpt_ends(state, arch))
        return out
    scale = math.sqrt(cfg.d_model) if arch in GEMMA_ARCHITECTURES else 1.0
    out["model.embed_tokens.weight"] = state["embed.W_E"] / scale
    out["model.norm.weight"] = state["ln_final.w"] - (1.0 if arch in GEMMA_ARCHITECTURES else 0.0)
    out["lm_head.weight"] = state["unembed.W_U"].T
    return out


GPT_LIKE = ("GPTNeoXForCausalLM", "GPT2LMHeadModel")


def _gpt_block(state, arch, layer, q, k, v, bq, bk, bv, w_o) -> dict:
    import einops
    import torch

    b = f"blocks.{layer}."
    if arch == "GPT2LMHeadModel":
        p = f"transformer.h.{layer}."
        qkv = [einops.rearrange(w, "n m h -> m (n h)") for w in (q, k, v)]
        return {
            p + "ln_1.weight": state[b + "ln1.w"], p + "ln_1.bias": state[b + "ln1.b"],
            p + "attn.c_attn.weight": torch.cat(qkv, dim=1),
            p + "attn.c_attn.bias": torch.cat([x.reshape(-1) for x in (bq, bk, bv)]),
            p + "attn.c_proj.weight": w_o.T, p + "attn.c_proj.bias": state[b + "attn.b_O"],
            p + "ln_2.weight": state[b + "ln2.w"], p + "ln_2.bias": state[b + "ln2.b"],
            p + "mlp.c_fc.weight": state[b + "mlp.W_in"], p + "mlp.c_fc.bias": state[b + "mlp.b_in"],
            p + "mlp.c_proj.weight": state[b + "mlp.W_out"], p + "mlp.c_proj.bias": state[b + "mlp.b_out"],
        }
    p = f"gpt_neox.layers.{layer}."
    qkv = torch.stack([q, k, v])  # qkv n m h
    return {
        p + "input_layernorm.weight": state[b + "ln1.w"], p + "input_layernorm.bias": state[b + "ln1.b"],
        p + "attention.query_key_value.weight": einops.rearrange(qkv, "qkv n m h -> (n qkv h) m"),
        p + "attention.query_key_value.bias": einops.rearrange(torch.stack([bq, bk, bv]), "qkv n h -> (n qkv h)"),
        p + "attention.dense.weight": w_o, p + "attention.dense.bias": state[b + "attn.b_O"],
        p + "post_attention_layernorm.weight": state[b + "ln2.w"],
        p + "post_attention_layernorm.bias": state[b + "ln2.b"],
        p + "mlp.dense_h_to_4h.weight": state[b + "mlp.W_in"].T, p + "mlp.dense_h_to_4h.bias": state[b + "mlp.b_in"],
        p + "mlp.dense_4h_to_h.weight": state[b + "mlp.W_out"].T, p + "mlp.dense_4h_to_h.bias": state[b + "mlp.b_out"],
    }


def _gpt_ends(state, arch) -> dict:
    if arch == "GPT2LMHeadModel":
        return {"transformer.wte.weight": state["embed.W_E"], "transformer.wpe.weight": state["pos_embed.W_pos"],
                "transformer.ln_f.weight": state["ln_final.w"], "transformer.ln_f.bias": state["ln_final.b"],
                "lm_head.weight": state["unembed.W_U"].T}
    return {"gpt_neox.embed_in.weight": state["embed.W_E"], "gpt_neox.final_layer_norm.weight": state["ln_final.w"],
            "gpt_neox.final_layer_norm.bias": state["ln_final.b"], "embed_out.weight": state["unembed.W_U"].T,
            "lm_head.weight": state["unembed.W_U"].T}
