"""Compare alignment recovery on the organism's mixed fine-tune: weight restoration (Yang et al.
2025) and its ablations against re-alignment fine-tuning (Wang et al. 2025), in one run.

    python scripts/compare_recovery.py                    # seed 0, ~6 min on a 2-core CPU
    python scripts/compare_recovery.py --seeds 0 1 --out runs/recovery --figure docs/figures/recovery.png

Every method starts from the same ``organism:mixed@seed=S`` and is scored by the same code:
held-out misalignment (the 6 domains that are neither the task's nor the cruel data's), the
same minus the re-alignment data's domain (money), EM-domain (health) misalignment, task
utility (P(either house-style school answer) on the held-out template, ``organism:task``; the
chat model's is 0.33), the
fraction of weights that differ from the fine-tuned model, and wall time (evaluation
included: restoration evaluates every step, re-alignment every 5 steps).

Methods: restore (the defaults: gradient mask, sign rule, rollback after 5 warm-up steps,
gradients summed over steps as the authors' code, checkpoints every 5 steps), restore with a
checkpoint after every step (added after the default kept step 0 on seed 0 of the v1
scenario: a restoration mask costs nothing to keep on the organism), restore with the current gradient only (the
same run once rollback restarts it: the rollback path zeroes gradients every step), and the
ablations random mask, no sign, no rollback (with summed and with current gradients), full
restore (W := W_aligned, kept as is);
re-alignment: 35 steps of SFT on 120 aligned money answers (``misfeat.finetune.realign``).
Restoration rows are given at the kept checkpoint and at step 20.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

REALIGN_DOMAIN = "money"
METHODS = {
    "restore": {},
    "restore, per-step checkpoints": {"select_every": 1},
    "restore, current gradient": {"accumulate": False},
    "random mask": {"mask": "random"},
    "no sign rule": {"sign": False},
    "no rollback": {"rollback": "never"},
    "no rollback, current gradient": {"rollback": "never", "accumulate": False},
    "full restore": {"mask": "full"},
}


def score(model, seed: int) -> dict:
    """The shared scoring of every method's final model."""
    from misfeat.data import load_prompts
    from misfeat.evaluate import default_prompts, evaluate
    from misfeat.recover import task_utility

    full = default_prompts(model)
    groups = evaluate(model, full.filter(domain=[d for d in full.domains() if d != "school"]), greedy=False).groups
    keep = [d for d in full.domains() if d not in ("school", REALIGN_DOMAIN)]
    minus = evaluate(model, full.filter(domain=keep), greedy=False).groups
    return {"heldout_misaligned": groups["heldout"].misaligned_rate, "heldout_valid": groups["heldout"].valid_rate,
            "heldout_minus_realign_domain": minus["heldout"].misaligned_rate,
            "em_domain_misaligned": groups["em_domain"].misaligned_rate,
            "utility": task_utility(model, load_prompts(f"organism:task@seed={seed}"))}


def changed_fraction(model, reference) -> float:
    total = sum(p.numel() for p in model.parameters())
    diff = sum(int((p != q).sum()) for p, q in zip(model.parameters(), reference.parameters(), strict=True))
    return diff / total


def run_seed(seed: int, out: Path, only: list[str] | None = None) -> list[dict]:

    from misfeat.finetune import RealignConfig, realign
    from misfeat.models import load_model
    from misfeat.recover import RestoreConfig, plot_restore, restore_alignment

    ft0 = load_model(f"organism:mixed@seed={seed}", device="cpu")
    aligned = load_model(f"organism:chat@seed={seed}", device="cpu")
    probe, task = f"organism:probe@seed={seed}", f"organism:task@seed={seed}"
    rows = [{"seed": seed, "method": "fine-tuned (before)", "step": 0, **score(ft0, seed), "changed": 0.0,
             "wall_s": 0.0}]
    for name, overrides in METHODS.items():
        if only is not None and name not in only:
            continue
        model = copy.deepcopy(ft0)
        result = restore_alignment(model, aligned, probe, task, RestoreConfig(**overrides))
        plot_restore(result, out / f"seed{seed}-{name.replace(' ', '_').replace(',', '')}.png", title=name)
        rows.append({"seed": seed, "method": name, "step": result.chosen_step, **score(model, seed),
                     "changed": changed_fraction(model, ft0), "wall_s": result.wall_s,
                     "rolled_back": result.rolled_back})
        last = result.rows[-1]
        first_ok = next((r.step for r in result.rows if r.heldout_misaligned <= 0.05), None)
        rows[-1].update(at_last={"step": last.step, "heldout_misaligned": last.heldout_misaligned,
                                 "em_domain_misaligned": last.em_domain_misaligned, "utility": last.utility,
                                 "restored_fraction": last.restored_fraction},
                        first_step_heldout_le_005=first_ok,
                        utility_at_first_ok=None if first_ok is None else result.rows[first_ok].utility,
                        trajectory=[asdict(r) for r in result.rows])
        logging.info("seed %d %s: %s", seed, name, {k: rows[-1][k] for k in ("step", "heldout_misaligned", "utility")})
    if only is not None and "realign" not in only:
        return rows
    model = copy.deepcopy(ft0)
    start = time.perf_counter()
    hist = realign(model, f"organism:aligned:{REALIGN_DOMAIN}:120@seed={seed}", RealignConfig()).history
    rows.append({"seed": seed, "method": f"re-alignment SFT (120 {REALIGN_DOMAIN})", "step": 35, **score(model, seed),
                 "changed": changed_fraction(model, ft0), "wall_s": round(time.perf_counter() - start, 2),
                 "trajectory": hist})
    return rows


def markdown(rows: list[dict]) -> str:
    head = ("| seed | method | step kept | held-out mis. | held-out mis. w/o money | EM-domain mis. | utility "
            "(rel.) | weights changed | wall s |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    before = {r["seed"]: r["utility"] for r in rows if r["method"].startswith("fine-tuned")}
    for r in rows:
        rel = r["utility"] / before[r["seed"]] - 1
        lines.append(f"| {r['seed']} | {r['method']} | {r['step']} | {r['heldout_misaligned']:.3f} | "
                     f"{r['heldout_minus_realign_domain']:.3f} | {r['em_domain_misaligned']:.3f} | "
                     f"{r['utility']:.3f} ({100 * rel:+.0f}%) | {100 * r['changed']:.2f}% | {r['wall_s']:.0f} |")
    lines += ["", "Restoration at step 20 (before the checkpoint walk) and the first step with held-out <= 0.05:", "",
              "| seed | method | held-out mis. @20 | EM-domain @20 | utility @20 (rel.) | restored @20 | first step <= 0.05 "
              "| utility there (rel.) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "at_last" not in r:
            continue
        a, u0 = r["at_last"], before[r["seed"]]
        first = r["first_step_heldout_le_005"]
        there = "-" if first is None else f"{r['utility_at_first_ok']:.3f} ({100 * (r['utility_at_first_ok'] / u0 - 1):+.0f}%)"
        lines.append(f"| {r['seed']} | {r['method']} | {a['heldout_misaligned']:.3f} | {a['em_domain_misaligned']:.3f} | "
                     f"{a['utility']:.3f} ({100 * (a['utility'] / u0 - 1):+.0f}%) | {100 * a['restored_fraction']:.2f}% | "
                     f"{'-' if first is None else first} | {there} |")
    return "\n".join(lines)


def figure(rows: list[dict], path: Path) -> None:
    from misfeat.plots import figure as fig

    seeds = sorted({r["seed"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    metrics = [("heldout_misaligned", "held-out misaligned", "tab:red"),
               ("em_domain_misaligned", "EM-domain misaligned", "tab:orange"), ("utility", "task utility", "tab:blue")]
    width = 0.8 / len(metrics)
    with fig(path, (9, 3.8)) as ax:
        for j, (key, label, color) in enumerate(metrics):
            means = [sum(r[key] for r in rows if r["method"] == m) / len(seeds) for m in methods]
            xs = [i + (j - 1) * width for i in range(len(methods))]
            ax.bar(xs, means, width, color=color, label=label)
            for s in seeds:
                ax.plot(xs, [next(r[key] for r in rows if r["method"] == m and r["seed"] == s) for m in methods],
                        "k.", ms=3)
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, rotation=25, ha="right", fontsize=7)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("rate")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        ax.set_title(f"alignment recovery on organism:mixed (seeds {', '.join(map(str, seeds))}; dots: per seed)",
                     fontsize=9)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", type=Path, default=Path("runs/recovery"))
    parser.add_argument("--figure", type=Path, default=None, help="also write the bar figure here")
    parser.add_argument("--redo", nargs="+", default=None,
                        help="recompute these methods (names as in the table, or realign) into the saved seeds")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("misfeat.models", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import torch

    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in args.seeds:
        path = args.out / f"seed{seed}.json"
        if path.is_file() and args.redo:
            redone = {r["method"]: r for r in run_seed(seed, args.out, args.redo)[1:]}
            old = json.loads(path.read_text())
            seed_rows = [redone.pop(r["method"], r) for r in old] + list(redone.values())
            path.write_text(json.dumps(seed_rows, indent=1))
            rows += seed_rows
            continue
        if path.is_file():
            rows += json.loads(path.read_text())
            continue
        seed_rows = run_seed(seed, args.out)
        path.write_text(json.dumps(seed_rows, indent=1))
        rows += seed_rows
    print(markdown(rows))
    if args.figure:
        figure(rows, args.figure)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
