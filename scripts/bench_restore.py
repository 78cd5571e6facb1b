"""Benchmark: seconds per weight-restoration step against one re-alignment fine-tuning step, on
the organism's mixed fine-tune, measured in the same run.

    python scripts/bench_restore.py                # ~1 min on a 2-core CPU

- restoration step (``misfeat.restore_engine.Restorer.restore_step``): the gradient of
  ``-cos(state, aligned direction)`` over the 256 probe prompts (4 batches of 64, forward
  stopped after block 1), the sign rule and the top-k over the candidates, the writes;
- restoration step with rollback: the same plus the task-direction gradient (64 task
  prompts) and the put-back;
- re-alignment step (``misfeat.finetune.realign``, its defaults: batch 8, AdamW): the run
  of ``--steps`` steps with an evaluation set of one prompt (so evaluation is negligible),
  divided by the steps.

Per-step evaluation (misalignment and utility after every restoration step) is not
included in either; other agents share the machine, so each figure is the best of
``--repeats`` runs. Prints a table with the ratios.
"""

from __future__ import annotations

import argparse
import copy
import logging
import time


def time_restore(ft0, aligned, steps: int, rollback: bool) -> float:
    from misfeat.data import load_prompts
    from misfeat.recover import RestoreConfig
    from misfeat.restore_engine import Restorer

    model = copy.deepcopy(ft0)
    cfg = RestoreConfig(layer=1)
    runner = Restorer(model, aligned, load_prompts("organism:probe"), load_prompts("organism:task"), cfg,
                      measure=lambda *a: None, row_type=dict)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        restored = runner.restore_step(step, rollback)
        if rollback:
            runner.rollback_step(restored)
    return (time.perf_counter() - start) / steps


def time_realign(ft0, steps: int) -> float:
    from misfeat.data import load_prompts
    from misfeat.finetune import RealignConfig, realign

    model = copy.deepcopy(ft0)
    one = load_prompts("organism:heldout").filter(domain="law")
    one = type(one)("one prompt", one.records[:1], one.meta)
    start = time.perf_counter()
    realign(model, "organism:aligned:money:120", RealignConfig(steps=steps, eval_every=10_000), eval_prompts=one)
    return (time.perf_counter() - start) / steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="steps per timing (default 10)")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs (default 3)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import torch

    from misfeat.io import format_table
    from misfeat.models import load_model

    torch.set_num_threads(1)
    ft0, aligned = load_model("organism:mixed", device="cpu"), load_model("organism:chat", device="cpu")
    best = {"restore": [], "restore + rollback": [], "realign": []}
    for _ in range(args.repeats):
        best["restore"].append(time_restore(ft0, aligned, args.steps, rollback=False))
        best["restore + rollback"].append(time_restore(ft0, aligned, args.steps, rollback=True))
        best["realign"].append(time_realign(ft0, args.steps))
    base = min(best["realign"])
    rows = [{"step": name, "s/step (best)": min(v), "s/step (median)": sorted(v)[len(v) // 2],
             "ratio vs realign": min(v) / base} for name, v in best.items()]
    print(f"organism:mixed, 1 thread, {args.steps} steps x {args.repeats} repeats")
    print(format_table(rows, floatfmt=".4f"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
