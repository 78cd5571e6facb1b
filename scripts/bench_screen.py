"""Benchmark of locate's causal screen: seconds per screened candidate, one evaluation per
setting (the former code path, ``batched=False``) vs every candidate x coefficient in shared
forward passes (``batched=True``, the default), measured in the same run on the same latents;
checks both give the same rows.

    python scripts/bench_screen.py [--sae DIR] [--candidates 6] [--repeats 1] [--device cuda]

Models: organism:chat (aligned) and organism:em (misaligned), prompts organism:heldout. Without
--sae, a TopK SAE with random unit decoder rows at blocks.1.hook_resid_post stands in (the cost
of the screen does not depend on what the latents mean).
"""

from __future__ import annotations

import argparse
import time


def random_sae(d_in: int, d_sae: int, hook: str):
    import torch
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=8, metadata=SAEMetadata(hook_name=hook)))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        w = torch.randn(d_sae, d_in, generator=gen)
        sae.W_dec.copy_(w / w.norm(dim=1, keepdim=True))
        sae.W_enc.copy_(sae.W_dec.t())
    return sae.eval()


def main() -> None:
    import torch

    torch.set_num_threads(1)
    from misfeat.features.screen import causal_screen
    from misfeat.models import load_model
    from misfeat.sae.io import load_sae

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sae", default=None)
    p.add_argument("--candidates", type=int, default=6)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--device", default="cpu", help="where the models and the SAE run (on CUDA the timings "
                   "synchronise the device first; wall time is then the figure, CPU time is the host's share)")
    args = p.parse_args()
    chat, em = load_model("organism:chat", device=args.device), load_model("organism:em", device=args.device)
    sae = load_sae(args.sae) if args.sae else random_sae(chat.cfg.d_model, 64, "blocks.1.hook_resid_post")
    sae = sae.to(args.device)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    latents = list(range(args.candidates))
    timings, cpu, rows = {}, {}, {}
    for batched in (False, True):
        best = best_cpu = float("inf")
        for _ in range(args.repeats):
            sync()
            start, start_cpu = time.perf_counter(), time.process_time()
            result = causal_screen(sae, latents, chat, em, "organism:heldout", batched=batched)
            sync()
            best, best_cpu = min(best, time.perf_counter() - start), min(best_cpu, time.process_time() - start_cpu)
        timings[batched], cpu[batched], rows[batched] = best, best_cpu, result.rows
    for a, b in zip(rows[False], rows[True], strict=True):
        assert abs(a.steer_up_misaligned - b.steer_up_misaligned) < 1e-4, (a, b)
        assert abs(a.clamp_misaligned - b.clamp_misaligned) < 1e-4, (a, b)
    n = len(latents)
    print(f"candidates: {n}, coefficients: 3 (x2 sides + clamp); threads: 1; device: {args.device}")
    for name, t in (("wall", timings), ("CPU", cpu)):
        print(f"{name}: before (one evaluation per setting) {t[False] / n:.3f} s per candidate, after (batched) "
              f"{t[True] / n:.3f} s per candidate; ratio before/after {t[False] / t[True]:.2f}x")
    print("rows equal to 1e-4; wall times depend on the machine's load, CPU times much less")


if __name__ == "__main__":
    main()
