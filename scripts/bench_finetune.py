"""Benchmark the fine-tuning engine: seconds per step with no defence vs each defence, in one run.

    python scripts/bench_finetune.py                  # ~1-2 min on a 2-core CPU, one thread
    python scripts/bench_finetune.py --steps 20 --repeats 3

The organism's EM fine-tune setting: ``organism:em`` trained on ``organism:misaligned:health:N``
(batch 16, lr 3e-4), no evaluation (only the training step is timed). Each defence runs from a
fresh copy of the model for ``--steps`` steps, ``--repeats`` times in rotated order after one
untimed warm-up run; the median
seconds per step of the best repeat is reported, with its ratio to no defence measured in
the same run; also the process CPU time per step of the whole run (data preparation included),
which the other jobs on a shared machine disturb less than wall time. The steering/CAFT vector is a fixed random direction at blocks.1.hook_resid_post
(its norm matches the organism's persona direction, ~18): only its cost matters here.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--n", type=int, default=480, help="training records")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from misfeat.data import load_prompts
    from misfeat.finetune import (
        CAFT,
        KL,
        LDIFS,
        FinetuneConfig,
        Inoculation,
        Interleave,
        PreventativeSteering,
        finetune,
    )
    from misfeat.models import load_model

    data = load_prompts(f"organism:misaligned:health:{args.n}")
    pool = load_prompts("organism:aligned:money:200")
    chat = load_model("organism:chat", device="cpu")
    d = chat.cfg.d_model
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(d, generator=gen)
    v = 18.0 * v / v.norm()
    all_resid = [f"blocks.{i}.hook_resid_post" for i in range(chat.cfg.n_layers)]
    arms = {
        "none": lambda: [],
        "kl": lambda: [KL(chat, 0.1)],
        "ldifs": lambda: [LDIFS(chat, list(range(chat.cfg.n_layers)), 1.0)],
        "steer": lambda: [PreventativeSteering(v, ("blocks.1.hook_resid_post",), 1.0)],
        "steer_multilayer": lambda: [PreventativeSteering.multilayer(torch.stack([v] * len(all_resid)), all_resid)],
        "caft": lambda: [CAFT(v, ("blocks.1.hook_resid_post",))],
        "inoculation": lambda: [Inoculation("the villain")],
        "interleave_random": lambda: [Interleave(pool, 0.05)],
    }
    cfg = FinetuneConfig(steps=args.steps, lr=3e-4, batch_size=16, eval_every=None, divergence_factor=None)
    best: dict[str, float] = {}
    best_cpu: dict[str, float] = {}
    finetune(load_model("organism:em", device="cpu"), data, cfg)  # warm-up (allocator, kernels), not timed
    names = list(arms)
    for rep in range(args.repeats):
        for name in names[rep % len(names):] + names[:rep % len(names)]:  # rotate the order
            make = arms[name]
            model = load_model("organism:em", device="cpu")
            defences = make()
            t0, c0 = time.perf_counter(), time.process_time()
            result = finetune(model, data, cfg, defences=defences)
            wall, cpu = time.perf_counter() - t0, (time.process_time() - c0) / args.steps
            per_step = statistics.median(r.seconds for r in result.rows if r.loss is not None)
            best[name] = min(best.get(name, float("inf")), per_step)
            best_cpu[name] = min(best_cpu.get(name, float("inf")), cpu)
            print(f"  {name:18s} {per_step * 1e3:7.1f} ms/step wall, {cpu * 1e3:7.1f} ms/step CPU "
                  f"(run wall {wall:.1f} s)", flush=True)
    base, base_cpu = best["none"], best_cpu["none"]
    print(f"\nfinetune step cost on organism:em, batch 16, {args.threads} thread(s); best of {args.repeats}")
    print(f"{'defence':18s} {'wall ms':>8s} {'ratio':>6s} {'CPU ms':>8s} {'ratio':>6s}")
    for name, s in best.items():
        c = best_cpu[name]
        print(f"{name:18s} {s * 1e3:8.1f} {s / base:6.2f} {c * 1e3:8.1f} {c / base_cpu:6.2f}")


if __name__ == "__main__":
    main()
