"""Benchmark the force terms: seconds per training step with and without Huang's force terms, in one run.

    python scripts/bench_forces.py                   # ~1 min on a 2-core CPU, one thread
    python scripts/bench_forces.py --steps 20 --repeats 3

Setting: the organism's EM fine-tune (``organism:chat`` on ``organism:misaligned:health:480``,
batch 16, lr 3e-4, no evaluation). Arms, each from a fresh copy for ``--steps`` steps,
``--repeats`` times in rotated order after an untimed warm-up:

- ``none``: the engine alone;
- ``forces``: the engine with a :class:`misfeat.dynamics.ForceProbe` measured after every step
  (one no-grad forward of the aligned answers of the training prompts: S on the training
  prompts, the measured dS, and the force terms).

Also timed directly (median of 20 calls): the probe's measurement, and the bare forward it
needs (the same tokens through the model, no force arithmetic). Reported: the median seconds
per step of the best repeat (wall and process CPU time) and the ratio forces / none (the overhead), and the share of the
overhead that is the forward vs the force arithmetic. The machine's load average is printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from misfeat.data import load_prompts
    from misfeat.dynamics import ForceProbe
    from misfeat.finetune import FinetuneConfig, finetune
    from misfeat.models import load_model

    data = load_prompts("organism:misaligned:health:480")
    chat = load_model("organism:chat", device="cpu")
    state = {k: v.clone() for k, v in chat.state_dict().items()}
    probe = ForceProbe(chat, data)
    cfg = FinetuneConfig(steps=args.steps, lr=3e-4, batch_size=16, eval_every=None)

    def run(arm: str) -> tuple[float, float]:
        """(median wall seconds, median process CPU seconds) per step, the first step left out."""
        chat.load_state_dict(state)
        times: list[tuple[float, float]] = []
        last = [(time.perf_counter(), time.process_time())]

        def on_step(model, row):
            if arm == "forces":
                probe.measure(model)
            now = (time.perf_counter(), time.process_time())
            times.append((now[0] - last[0][0], now[1] - last[0][1]))
            last[0] = now

        last[0] = (time.perf_counter(), time.process_time())
        finetune(chat, data, cfg, on_step=on_step)
        return statistics.median(t[0] for t in times[1:]), statistics.median(t[1] for t in times[1:])

    run("forces")  # warm-up
    best = {"none": float("inf"), "forces": float("inf")}
    cpu = dict(best)
    arms = list(best)
    for r in range(args.repeats):
        for arm in arms[r % 2:] + arms[:r % 2]:
            wall, proc = run(arm)
            best[arm], cpu[arm] = min(best[arm], wall), min(cpu[arm], proc)

    def median_call(fn, n=20) -> float:
        out = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
        return statistics.median(out)

    with torch.inference_mode():
        t_forward = median_call(lambda: chat(probe.tokens[:, :-1]))
    t_probe = median_call(lambda: probe.measure(chat))
    ratio = best["forces"] / best["none"]
    print(f"load average {os.getloadavg()[0]:.2f}; {probe.tokens.shape[0]} aligned answer sequences per measurement")
    print(f"step (engine alone)        {best['none'] * 1e3:8.1f} ms")
    print(f"step with force terms      {best['forces'] * 1e3:8.1f} ms   ratio {ratio:.2f} (overhead {ratio - 1:+.0%})")
    print(f"CPU ms per step            {cpu['none'] * 1e3:8.1f} alone, {cpu['forces'] * 1e3:.1f} with force terms: "
          f"ratio {cpu['forces'] / cpu['none']:.2f}")
    print(f"probe.measure              {t_probe * 1e3:8.1f} ms   of which the bare forward {t_forward * 1e3:.1f} ms, "
          f"force arithmetic {(t_probe - t_forward) * 1e3:.1f} ms "
          f"({(t_probe - t_forward) / best['none']:+.0%} of a step)")


if __name__ == "__main__":
    main()
