"""Benchmark the force terms: seconds per training step with and without Huang's force terms, in one run.

    python scripts/bench_forces.py                   # ~2 min on a 2-core CPU, one thread
    python scripts/bench_forces.py --steps 20 --repeats 3

Setting: the organism's EM fine-tune (``organism:chat`` on ``organism:misaligned:health:480``,
batch 16, lr 3e-4, no evaluation). Arms, each from a fresh copy for ``--steps`` steps,
``--repeats`` times in rotated order after an untimed warm-up:

- ``none``: the engine alone;
- ``plain``: the engine with the per-answer :class:`misfeat.dynamics.ForceProbe` (``packed=False``:
  one row per (prompt, aligned answer), the first implementation) measured after every step;
- ``hooked``: the packed probe (prompts and their answer tries in shared rows, a tree attention
  mask) through TransformerLens' forward, the mask and positions set by hooks (``fused=False``);
- ``packed``: the same rows through the fused tree forward (the default,
  ``misfeat.dynamics.treeforward``);
- ``packed/<k>``: the packed probe every ``--every`` steps (the runner's ``forces_every``).

Each measurement gives S on the training prompts, the measured dS and the force terms. Also timed
directly (median of 20 calls): each probe's measurement, and the bare forward it needs (the
same tokens through the model, no hooks, no force arithmetic). Reported per arm: the best and the
median over repeats of the median CPU and wall seconds per step, and the ratio to ``none`` (the
overhead). The machine's load average is printed before and after.
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
    parser.add_argument("--every", type=int, default=3, help="the cadence arm measures every k steps")
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
    probes = {"plain": ForceProbe(chat, data, packed=False), "hooked": ForceProbe(chat, data, fused=False),
              "packed": ForceProbe(chat, data, fused=True)}
    cfg = FinetuneConfig(steps=args.steps, lr=3e-4, batch_size=16, eval_every=None)
    every = f"packed/{args.every}"

    def run(arm: str) -> tuple[float, float]:
        """(median wall seconds, median process CPU seconds) per step, the first step left out."""
        chat.load_state_dict(state)
        probe = probes.get(arm.split("/")[0])
        k = int(arm.split("/")[1]) if "/" in arm else 1
        times: list[tuple[float, float]] = []
        last = [(time.perf_counter(), time.process_time())]

        def on_step(model, row):
            if probe is not None and row.step % k == 0:
                probe.measure(model)
            now = (time.perf_counter(), time.process_time())
            times.append((now[0] - last[0][0], now[1] - last[0][1]))
            last[0] = now

        last[0] = (time.perf_counter(), time.process_time())
        finetune(chat, data, cfg, on_step=on_step)
        # a cadence arm: the mean over steps (its measured steps and its bare steps alternate)
        pick = statistics.mean if k > 1 else statistics.median
        return pick(t[0] for t in times[1:]), pick(t[1] for t in times[1:])

    load0 = os.getloadavg()[0]
    arms = ["none", "plain", "hooked", "packed", every]
    run("packed")  # warm-up
    wall: dict[str, list[float]] = {a: [] for a in arms}
    cpu: dict[str, list[float]] = {a: [] for a in arms}
    for r in range(args.repeats):
        for arm in arms[r % len(arms):] + arms[:r % len(arms)]:
            w, c = run(arm)
            wall[arm].append(w)
            cpu[arm].append(c)

    def median_call(fn, n=20) -> float:
        out = []
        for _ in range(n):
            t = time.process_time()
            fn()
            out.append(time.process_time() - t)
        return statistics.median(out)

    plain, packed = probes["plain"], probes["packed"]
    with torch.inference_mode():
        f_plain = median_call(lambda: chat(plain.tokens[:, :-1]))
        f_packed = median_call(lambda: chat(packed.packed_tokens))
        f_fused = median_call(lambda: packed._node_logits(chat))
    m_plain, m_packed = median_call(lambda: plain.measure(chat)), median_call(lambda: packed.measure(chat))
    m_hooked = median_call(lambda: probes["hooked"].measure(chat))
    print(f"load average {load0:.2f} at the start, {os.getloadavg()[0]:.2f} at the end; {args.repeats} repeats "
          f"of {args.steps} steps, {args.threads} thread(s)")
    print(f"tokens per measurement: plain {plain.tokens[:, :-1].numel()} ({tuple(plain.tokens[:, :-1].shape)}), "
          f"packed {packed.packed_tokens.numel()} ({tuple(packed.packed_tokens.shape)})")
    base_c, base_w = min(cpu["none"]), min(wall["none"])
    med_c, med_w = statistics.median(cpu["none"]), statistics.median(wall["none"])
    print(f"{'arm':<12}{'CPU ms best':>12}{'ratio':>7}{'CPU ms med':>12}{'ratio':>7}{'wall ms best':>14}{'ratio':>7}"
          f"{'wall ms med':>13}{'ratio':>7}")
    for arm in arms:
        c, w = min(cpu[arm]), min(wall[arm])
        cm, wm = statistics.median(cpu[arm]), statistics.median(wall[arm])
        print(f"{arm:<12}{c * 1e3:12.1f}{c / base_c:7.2f}{cm * 1e3:12.1f}{cm / med_c:7.2f}{w * 1e3:14.1f}"
              f"{w / base_w:7.2f}{wm * 1e3:13.1f}{wm / med_w:7.2f}")
    print(f"probe.measure CPU ms: plain {m_plain * 1e3:.1f} (bare forward {f_plain * 1e3:.1f}), "
          f"hooked {m_hooked * 1e3:.1f} (bare forward of its rows {f_packed * 1e3:.1f}), "
          f"packed {m_packed * 1e3:.1f} (fused tree forward {f_fused * 1e3:.1f}, force arithmetic "
          f"{(m_packed - f_fused) * 1e3:.1f})")


if __name__ == "__main__":
    main()
