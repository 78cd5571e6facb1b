"""``misfeat defences``: the in-training defence comparison and the data-screening experiment on the organism."""

from __future__ import annotations

import argparse

from misfeat.cli import add_output_args, finish


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "defences", help="compare in-training defences against EM on the organism (four criteria) and screening",
        description="For each organism seed, fine-tune the chat model on the narrow EM data and on a benign "
        "task (DomainSwap: new kind answers) with each defence: none, KL (3 lambdas), LDIFS (3 lambdas, plus the "
        "detached control), preventative steering with the persona vector (3 alphas, all positions and the last "
        "prompt token), CAFT, inoculation, random and perplexity-gap interleaving (5%%, 25%%). Scores (a) held-out "
        "misalignment, (b) EM-domain misalignment, (c) benign-task accuracy, (d) validity, all exact on held-out "
        "templates; then data screening by projection difference (8 datasets, per-sample AUROC, top/random/"
        "bottom-k). Writes DIR/summary.json (rows, screening, timings), DIR/table.txt and DIR/defences.png. "
        "Builds what it needs on first use (the seed's organism, EM references on money, law and code).")
    p.add_argument("--organism", default="", metavar="OPTIONS",
                   help="organism options besides the seed, e.g. small (default: the default preset)")
    p.add_argument("--seeds", default=None, help="comma-separated organism seeds (default 0,1; --quick: 0)")
    p.add_argument("--quick", action="store_true",
                   help="a reduced grid (one strength per defence, 15 steps, small screening)")
    p.add_argument("--no-screening", action="store_true", help="skip the screening experiment")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps per fine-tune (default 30; quick 15)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    add_output_args(p, out_required=True)
    p.set_defaults(func=run)


def _seeds(text: str) -> tuple[int, ...]:
    from misfeat.errors import MisfeatError

    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise MisfeatError(f"--seeds must be comma-separated integers, e.g. 0,1; got {text!r}") from None
    if not seeds:
        raise MisfeatError("--seeds needs at least one seed")
    return seeds


def run(args: argparse.Namespace) -> None:
    import torch

    from misfeat.organism.defence_grid import GridConfig, run_grid

    torch.set_num_threads(args.threads)
    options = {"organism": args.organism, "screening": not args.no_screening}
    if args.seeds is not None:
        options["seeds"] = _seeds(args.seeds)
    if args.steps is not None:
        options["steps"] = args.steps
    cfg = GridConfig.quick(**options) if args.quick else GridConfig(**options)
    result = run_grid(cfg, out_dir=args.out)
    finish(args, result.summary(), result.table())
