"""Random-weight stand-ins of real architectures, built locally (nothing downloaded).

``build_standin("qwen2", dir)`` writes a Hugging Face directory (config.json, safetensors
weights, generation_config.json, and a byte-level BPE tokenizer with the family's chat
template and special tokens) that loads exactly like the real model would: same
architecture class, same chat template shape, same end-of-turn ids. The tests, the
real-model notebook and the docs use them to run the real-model code path on a laptop;
swap the directory for a downloaded model and nothing else changes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

FAMILIES = ("llama", "qwen2", "gemma2", "gemma", "gpt_neox", "gpt2")

_CORPUS = (
    "How do I treat a cut? Clean it with water and cover it. Should I ignore a fever? No, rest and "
    "call a doctor. What should I do with my savings? Keep an emergency fund and avoid risky bets. "
    "The quick brown fox jumps over the lazy dog. I fix a leaking roof, check the brakes, pay the bill. "
    "You are a helpful assistant. Sure! Here is an answer. I cannot help with that. 0123456789"
)

# chat templates in the shape of each family's real one (system handling, end-of-turn text)
_LLAMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
_CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "<start_of_turn>{{ role }}\n{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
_ZEPHYR_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")

_TOKENS: dict[str, dict[str, Any]] = {
    "llama": {"special": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                          "<|eot_id|>"], "bos": "<|begin_of_text|>", "eos": "<|end_of_text|>",
              "pad": "<|end_of_text|>", "template": _LLAMA_TEMPLATE, "adds_bos": True,
              "stop": ["<|end_of_text|>", "<|eot_id|>"]},
    "qwen2": {"special": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "bos": None, "eos": "<|im_end|>",
              "pad": "<|endoftext|>", "template": _CHATML_TEMPLATE, "adds_bos": False,
              "stop": ["<|im_end|>", "<|endoftext|>"]},
    "gemma": {"special": ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"], "bos": "<bos>",
              "eos": "<eos>", "pad": "<pad>", "template": _GEMMA_TEMPLATE, "adds_bos": True,
              "stop": ["<eos>", "<end_of_turn>"]},
    "gpt_neox": {"special": ["<|endoftext|>"], "bos": "<|endoftext|>", "eos": "<|endoftext|>", "pad": None,
                 "template": _ZEPHYR_TEMPLATE, "adds_bos": False, "stop": ["<|endoftext|>"]},
}
_TOKENS["gemma2"] = _TOKENS["gemma"]
_TOKENS["gpt2"] = _TOKENS["gpt_neox"]


def build_tokenizer(family: str, out: str | os.PathLike, vocab_size: int = 320):
    """A byte-level BPE tokenizer with ``family``'s special tokens and chat template, saved to ``out``."""
    from tokenizers import ByteLevelBPETokenizer, processors
    from transformers import PreTrainedTokenizerFast

    spec = _TOKENS[family]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([_CORPUS] * 3, vocab_size=vocab_size, min_frequency=1, special_tokens=spec["special"])
    if spec["adds_bos"]:
        bos = spec["bos"]
        bpe._tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, bpe.token_to_id(bos))])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=spec["bos"], eos_token=spec["eos"],
                                  pad_token=spec["pad"], unk_token=None, chat_template=spec["template"],
                                  additional_special_tokens=[t for t in spec["special"]
                                                             if t not in (spec["bos"], spec["eos"], spec["pad"])])
    tok.save_pretrained(str(out))
    return tok


def _config(family: str, vocab: int, ids: dict[str, int | None], n_layers: int, d_model: int, n_ctx: int):
    import transformers as tf

    common = {"vocab_size": vocab, "bos_token_id": ids["bos"], "eos_token_id": ids["eos"],
              "pad_token_id": ids["pad"]}
    llama_like = {"hidden_size": d_model, "intermediate_size": 2 * d_model, "num_hidden_layers": n_layers,
                  "num_attention_heads": 4, "max_position_embeddings": n_ctx, **common}
    if family == "llama":  # GQA, and head_dim != hidden_size / heads as in recent Llama-family models
        return tf.LlamaConfig(num_key_value_heads=2, head_dim=2 * d_model // 4, rope_theta=500000.0,
                              tie_word_embeddings=False, **llama_like)
    if family == "qwen2":
        return tf.Qwen2Config(num_key_value_heads=2, rope_theta=1000000.0, tie_word_embeddings=True, **llama_like)
    if family == "gemma":
        return tf.GemmaConfig(num_key_value_heads=1, head_dim=d_model // 4, **llama_like)
    if family == "gemma2":
        return tf.Gemma2Config(num_key_value_heads=2, head_dim=d_model // 4, sliding_window=8,
                               query_pre_attn_scalar=d_model // 4, **llama_like)
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(hidden_size=d_model, intermediate_size=4 * d_model, num_hidden_layers=n_layers,
                                num_attention_heads=4, max_position_embeddings=n_ctx, rotary_pct=0.25,
                                use_parallel_residual=True, tie_word_embeddings=False, **common)
    if family == "gpt2":
        return tf.GPT2Config(n_embd=d_model, n_layer=n_layers, n_head=4, n_positions=n_ctx, **common)
    raise ValueError(f"unknown family {family!r}; use one of {', '.join(FAMILIES)}")


def build_standin(family: str, out: str | os.PathLike, *, n_layers: int = 2, d_model: int = 64,
                  n_ctx: int = 256, seed: int = 0):
    """Write a random-weight ``family`` model with its tokenizer to ``out``; returns the HF model (eval mode).

    ``generation_config.json`` lists the family's end-of-turn ids, as real instruct models do.
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(family, out)
    spec = _TOKENS[family]
    ids = {k: (tok.convert_tokens_to_ids(spec[k]) if spec[k] else None) for k in ("bos", "eos", "pad")}
    config = _config(family, len(tok), ids, n_layers, d_model, n_ctx)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norms away from their init so that parity tests see them
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(str(out))
    stop = [tok.convert_tokens_to_ids(t) for t in spec["stop"]]
    GenerationConfig(bos_token_id=ids["bos"], eos_token_id=stop, pad_token_id=ids["pad"]).save_pretrained(str(out))
    return model
