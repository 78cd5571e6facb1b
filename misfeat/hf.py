"""Local Hugging Face directories: load them by their ``config.json``, export models back.

Loading never guesses from the path: TransformerLens picks Llama or Gemma from the model
*name*, so a Qwen2 directory under ``llama-runs/`` used to load as Llama (or fail). Here
the architecture is read from ``config.json``; TransformerLens's converter is run on a
neutrally named link to the directory, Gemma and Gemma 2 configs (which TransformerLens
3.x only knows by hub name) are built from ``config.json`` directly, and Llama-family
configs with ``head_dim != hidden_size / num_heads`` keep their ``head_dim``.

BOS follows the tokenizer: it is prepended when the tokenizer itself adds one
(``tokenizer("x")`` starts with ``bos_token_id``), unless ``prepend_bos`` overrides.

:func:`export_hf` writes a TransformerLens model loaded from such a directory (or a
misfeat checkpoint of it, e.g. a realigned model) back as a Hugging Face directory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from misfeat.errors import MisfeatError

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

logger = logging.getLogger(__name__)

GEMMA_ARCHITECTURES = ("GemmaForCausalLM", "Gemma2ForCausalLM")
LLAMA_LIKE = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
EXPORTABLE = (*LLAMA_LIKE, *GEMMA_ARCHITECTURES, "GPTNeoXForCausalLM", "GPT2LMHeadModel")
# words TransformerLens matches in a model name to pick an architecture without reading config.json
_NAME_GUESSES = ("llama", "gemma")


class HFLoadError(MisfeatError):
    """A local Hugging Face directory could not be loaded or exported; the message says why."""


def read_hf_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise HFLoadError(f"cannot read {path / 'config.json'}: {err}") from err
    if not config.get("architectures"):
        raise HFLoadError(f"{path / 'config.json'} names no architecture ('architectures' is missing); "
                          "save the model with model.save_pretrained(dir)")
    return config


def eos_ids_of(path: Path, config: dict[str, Any]) -> list[int]:
    """End-of-turn / EOS ids from ``generation_config.json`` (preferred) and ``config.json``."""
    ids: list[int] = []
    sources = [config]
    gen_file = path / "generation_config.json"
    if gen_file.is_file():
        with contextlib.suppress(OSError, json.JSONDecodeError):
            sources.insert(0, json.loads(gen_file.read_text()))
    for source in sources:
        value = source.get("eos_token_id")
        for i in (value if isinstance(value, list) else [value]):
            if isinstance(i, int) and i not in ids:
                ids.append(i)
    return ids


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """Whether ``tokenizer(text)`` (special tokens on) starts with its BOS id."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("x", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


# --- config ----------------------------------------------------------------------------


def _gemma_cfg(config: dict[str, Any], arch: str) -> dict[str, Any]:
    n_heads = config["num_attention_heads"]
    d_head = config.get("head_dim") or config["hidden_size"] // n_heads
    cfg = {
        "d_model": config["hidden_size"], "d_head": d_head, "n_heads": n_heads,
        "d_mlp": config["intermediate_size"], "n_layers": config["num_hidden_layers"],
        "n_ctx": config.get("max_position_embeddings", 8192), "eps": config.get("rms_norm_eps", 1e-6),
        "d_vocab": config["vocab_size"],
        "act_fn": config.get("hidden_activation") or config.get("hidden_act") or "gelu_pytorch_tanh",
        "initializer_range": config.get("initializer_range", 0.02), "normalization_type": "RMS",
        "rotary_base": float(_rope_theta(config)), "rotary_dim": d_head,
        "positional_embedding_type": "rotary", "use_attn_scale": True,
        "n_key_value_heads": config.get("num_key_value_heads", n_heads),
        "gated_mlp": True, "final_rms": True, "original_architecture": arch,
    }
    if arch == "Gemma2ForCausalLM":
        n_layers = config["num_hidden_layers"]
        layer_types = config.get("layer_types") or [
            "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]
        cfg.update({
            "attn_scale": math.sqrt(config.get("query_pre_attn_scalar", d_head)),
            "window_size": config.get("sliding_window", 4096), "use_local_attn": True,
            "attn_types": ["local" if t == "sliding_attention" else "global" for t in layer_types],
            "use_normalization_before_and_after": True,
        })
        if config.get("attn_logit_softcapping") is not None:
            cfg["attn_scores_soft_cap"] = float(config["attn_logit_softcapping"])
        if config.get("final_logit_softcapping") is not None:
            cfg["output_logits_soft_cap"] = float(config["final_logit_softcapping"])
    return cfg


def _rope_theta(config: dict[str, Any]) -> float:
    params = config.get("rope_parameters") or {}
    return config.get("rope_theta", params.get("rope_theta", 10000.0))


@contextlib.contextmanager
def _neutral_link(path: Path):
    """A symlink to ``path`` whose name TransformerLens cannot mistake for an architecture."""
    with tempfile.TemporaryDirectory(prefix="misfeat-hf-") as tmp:
        link = Path(tmp) / "model"
        if any(word in str(link).lower() for word in _NAME_GUESSES):
            raise HFLoadError(f"the temporary directory {tmp} contains one of {_NAME_GUESSES}; "
                              "set TMPDIR to another directory")
        link.symlink_to(path.resolve(), target_is_directory=True)
        yield link


def _tl_cfg_dict(path: Path, config: dict[str, Any]) -> dict[str, Any]:
    import transformer_lens.loading_from_pretrained as loading

    arch = config["architectures"][0]
    if arch in GEMMA_ARCHITECTURES:
        return _gemma_cfg(config, arch)
    try:
        with _neutral_link(path) as link, _gpt2_n_ctx_compat():
            cfg = loading.convert_hf_model_config(str(link), local_files_only=True)
    except AttributeError as err:
        raise HFLoadError(f"{path}/config.json could not be converted by TransformerLens: {err}") from err
    except (ValueError, NotImplementedError, KeyError, OSError) as err:
        raise HFLoadError(
            f"{path}: architecture {arch} is not supported by TransformerLens ({err}); see "
            "transformer_lens.loading_from_pretrained for the supported architectures"
        ) from err
    head_dim = config.get("head_dim")
    if arch in LLAMA_LIKE and head_dim and head_dim != cfg["d_head"]:
        # TransformerLens assumes hidden_size / num_heads for these; recent models differ
        cfg["d_head"] = head_dim
        cfg["rotary_dim"] = head_dim
    return cfg


def tl_config(path: Path, config: dict[str, Any], *, device: str, dtype, fold_ln: bool, prepend_bos: bool):
    """The ``HookedTransformerConfig`` of a local directory, from its ``config.json`` only."""
    from transformer_lens import HookedTransformerConfig

    cfg = _tl_cfg_dict(path, config)
    cfg.pop("tokenizer_name", None)
    cfg.pop("trust_remote_code", None)
    cfg.update({"model_name": path.name, "init_weights": False, "device": device, "n_devices": 1,
                "dtype": dtype, "from_checkpoint": False, "default_prepend_bos": prepend_bos})
    if fold_ln:
        cfg["normalization_type"] = {"LN": "LNPre", "RMS": "RMSPre"}.get(cfg["normalization_type"],
                                                                          cfg["normalization_type"])
    try:
        return HookedTransformerConfig.from_dict(cfg)
    except (TypeError, ValueError, AssertionError) as err:
        raise HFLoadError(f"{path}/config.json gives a configuration TransformerLens rejects: {err}") from err


@contextlib.contextmanager
def _gpt2_n_ctx_compat():
    """transformers >= 5 no longer stores ``n_ctx`` for GPT-2, but TransformerLens's
    converter reads it: expose ``n_positions`` under that name while converting."""
    from transformers import GPT2Config

    added = "n_ctx" not in GPT2Config.__dict__
    if added:
        GPT2Config.n_ctx = property(lambda self: self.__dict__.get("n_ctx", self.n_positions))
    try:
        yield
    finally:
        if added:
            del GPT2Config.n_ctx


# --- loading ---------------------------------------------------------------------------


def load_hf_dir(path: Path, device, dtype, process_weights: bool, tokenizer: Any, *,
                prepend_bos: bool | None = None) -> tuple[HookedTransformer, dict[str, Any]]:
    """A HookedTransformer from a local directory, and the metadata to keep with it
    (``hf_config``, ``hf_generation_config``, ``eos_token_ids``, ``prepend_bos``)."""
    import transformer_lens.loading_from_pretrained as loading
    from transformer_lens import HookedTransformer
    from transformers import AutoModelForCausalLM

    config = read_hf_config(path)
    if prepend_bos is None:
        prepend_bos = tokenizer_adds_bos(tokenizer)
    cfg = tl_config(path, config, device=str(device), dtype=dtype, fold_ln=process_weights,
                    prepend_bos=prepend_bos)
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=dtype)
    except Exception as err:  # transformers raises many error types here
        raise HFLoadError(f"transformers cannot load the weights in {path}: {err}") from err
    try:
        state = loading.get_pretrained_state_dict(str(path), cfg, hf_model=hf_model, dtype=dtype)
    except (ValueError, RuntimeError) as err:
        raise HFLoadError(f"{path}: the weights do not match the configuration: {err}") from err
    del hf_model
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    try:
        model.load_and_process_state_dict(state, fold_ln=process_weights, center_writing_weights=process_weights,
                                          center_unembed=process_weights, fold_value_biases=process_weights)
    except RuntimeError as err:
        raise HFLoadError(f"{path}: the weights do not match the configuration: {err}") from err
    gen_file = path / "generation_config.json"
    meta = {"hf_config": config, "eos_token_ids": eos_ids_of(path, config), "prepend_bos": prepend_bos}
    if gen_file.is_file():
        with contextlib.suppress(OSError, json.JSONDecodeError):
            meta["hf_generation_config"] = json.loads(gen_file.read_text())
    return model, meta


# --- export ----------------------------------------------------------------------------


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
