"""Local Hugging Face directories: load them by their ``config.json``, export models back.

Loading never guesses from the path: TransformerLens picks Llama or Gemma from the model
*name*, so a Qwen2 directory under ``llama-runs/`` used to load as Llama (or fail). Here
the architecture is read from ``config.json``; TransformerLens's converter is run on a
neutrally named link to the directory, Gemma and Gemma 2 configs (which TransformerLens
3.x only knows by hub name) are built from ``config.json`` directly, and Llama-family
configs with ``head_dim != hidden_size / num_heads`` keep their ``head_dim``.

BOS follows the tokenizer: it is prepended when the tokenizer itself adds one
(``tokenizer("x")`` starts with ``bos_token_id``), unless ``prepend_bos`` overrides.

:func:`misfeat.export.export_hf` writes such a model back as a Hugging Face directory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
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
