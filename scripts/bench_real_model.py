"""CPU cost of the real-model recipe's steps at Qwen2.5-0.5B-Instruct's true size.

Builds the TransformerLens model misfeat would run for Qwen2.5-0.5B (24 layers, d_model 896,
GQA 14/2 heads, d_mlp 4864, vocab 151936; config.json written here from the published
numbers, random weights: nothing downloaded) and times, on this machine's CPU:

- forward (cache / scoring): tokens per second;
- a partial fine-tuning step (response loss, AdamW, the MLPs of 4 middle layers, batch 8);
  a full fine-tune (all parameters: + 8 GB of gradients and AdamW state) is not run here, as
  this shared 24 GB machine cannot spare the memory; the doc estimates it from these figures;
- greedy generation with the KV cache: new tokens per second for a batch;
- the stand-in (2 layers, d 64) for the same steps, for the ratio.

Prints a table and the per-1k-prompt extrapolation used in docs/real-models.md
(prompt 64 tokens, response 64 tokens). Usage:

    OMP_NUM_THREADS=2 python scripts/bench_real_model.py [--threads 2] [--quick]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import types
from pathlib import Path

QWEN25_05B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
    "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "vocab_size": 151936, "hidden_act": "silu",
    "tie_word_embeddings": True, "initializer_range": 0.02, "bos_token_id": 151643, "eos_token_id": 151645,
}
PROMPT, RESPONSE, BATCH = 64, 64, 8  # the shapes the per-1k-prompt figures are for



def build(config: dict):
    import torch
    from transformer_lens import HookedTransformer

    from misfeat.hf import tl_config

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model"
        path.mkdir()
        (path / "config.json").write_text(json.dumps(config))
        cfg = tl_config(path, config, device="cpu", dtype=torch.float32, fold_ln=False, prepend_bos=False)
    cfg.init_weights = True
    model = HookedTransformer(cfg, move_to_device=False)
    model.eval()
    # random token ids need no real tokenizer; generation only asks it for a pad id
    model.tokenizer = types.SimpleNamespace(pad_token_id=0, eos_token_id=None, bos_token_id=None,
                                            padding_side="right")
    return model


def timed(fn, repeat: int, warmup: bool) -> float:
    if warmup:
        fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def bench(model, batch_size: int, new_tokens: int, repeat: int, warmup: bool, say) -> dict[str, float]:
    import torch

    from misfeat.data import Encoded, collate
    from misfeat.finetune import select_parameters
    from misfeat.generate import _generate_batch

    vocab = min(model.cfg.d_vocab, 50000)
    tokens = torch.randint(0, vocab, (batch_size, PROMPT + RESPONSE))
    out: dict[str, float] = {}
    with torch.inference_mode():
        out["forward_tok_s"] = tokens.numel() / timed(lambda: model(tokens), repeat, warmup)
    say("forward_tok_s", out["forward_tok_s"])
    middle = model.cfg.n_layers // 2
    chosen = select_parameters(model, [f"blocks.{i}.mlp." for i in range(middle - 2, middle + 2)])
    for p in model.parameters():
        p.requires_grad_(False)
    for _, p in chosen:
        p.requires_grad_(True)
    opt = torch.optim.AdamW([p for _, p in chosen], lr=1e-5)

    def step():
        logits = model(tokens)[:, PROMPT - 1:-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, PROMPT:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    out["finetune_mlp4_s_per_example"] = timed(step, repeat, warmup) / batch_size
    say("finetune_mlp4_s_per_example", out["finetune_mlp4_s_per_example"])
    opt.state.clear()
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
    batch = collate([Encoded(tuple(row.tolist()), PROMPT) for row in tokens[:, :PROMPT]], 0, "left")
    gen = torch.Generator().manual_seed(0)
    empty = torch.tensor([], dtype=torch.long)
    t = timed(lambda: _generate_batch(model, batch, new_tokens, 0.0, empty, gen), 1, False)
    out["generate_new_tok_s"] = batch_size * new_tokens / t
    say("generate_new_tok_s", out["generate_new_tok_s"])
    return out


def per_1k_prompts(r: dict[str, float]) -> dict[str, float]:
    """Seconds per 1,000 prompts of 64 prompt + 64 response tokens."""
    return {
        "cache / score (forward, 128 tokens)": 1000 * (PROMPT + RESPONSE) / r["forward_tok_s"],
        "generate 64 new tokens (KV cache)": 1000 * RESPONSE / r["generate_new_tok_s"],
        "fine-tune 1 epoch, 4 middle MLPs": 1000 * r["finetune_mlp4_s_per_example"],
    }


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=BATCH, help="rows per forward (default 8)")
    parser.add_argument("--new-tokens", type=int, default=RESPONSE, help="tokens generated per row (default 64)")
    parser.add_argument("--quick", action="store_true", help="one repeat, no warm-up (noisier)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    repeat, warmup = (1, False) if args.quick else (3, True)
    standin = dict(QWEN25_05B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=320)
    print(f"threads: {args.threads}, batch {args.batch} x ({PROMPT} prompt + {RESPONSE} response) tokens, "
          f"generation {args.new_tokens} new tokens", flush=True)
    rows = {}
    for name, config in (("stand-in (2 layers, d 64)", standin), ("Qwen2.5-0.5B size", QWEN25_05B)):
        model = build(config)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"\n{name}: {n_params / 1e6:.2f} M parameters", flush=True)
        rows[name] = bench(model, args.batch, args.new_tokens, repeat, warmup,
                           lambda key, value: print(f"  {key:30s} {value:12.4f}", flush=True))
        for key, value in per_1k_prompts(rows[name]).items():
            print(f"  per 1k prompts: {key:40s} {value:10.1f} s", flush=True)
        del model
    names = list(rows)
    print(f"\nforward tokens/s, stand-in / 0.5B: {rows[names[0]]['forward_tok_s'] / rows[names[1]]['forward_tok_s']:.0f}x")


if __name__ == "__main__":
    main()
