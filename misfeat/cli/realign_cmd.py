"""``misfeat realign``: minimal fine-tuning on correct data, tracking behaviour and features per step."""

from __future__ import annotations

import argparse

from misfeat.cli import add_device_args, add_model_args, add_output_args, finish


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "realign", help="reverse misalignment with a few fine-tuning steps, tracking the feature",
        description="Fine-tune a (misaligned) model on correct examples with a response-only loss, as in Wang et "
        "al. 2025 (~35 steps on ~120 samples). Every --eval-every steps it measures the held-out misaligned rate, "
        "validity, log-prob gap and each tracked feature. Without --eval-prompts, scoring uses the model's default "
        "evaluation set (a plug-in's; an organism's: every domain) with the training data's domains taken out of "
        "its headline group; the set's other groups are reported as <group>_misaligned_rate (an organism's EM "
        "domain: em_domain_misaligned_rate). Writes DIR/summary.json (steps, "
        "misaligned_rate, valid_rate, logprob_gap, feature_activation, ... as parallel lists), DIR/plot.png and "
        "the final checkpoint under DIR/checkpoints/.",
    )
    add_model_args(p)
    p.add_argument("--data", required=True, metavar="SPEC",
                   help="records with responses: a JSONL file, or organism:aligned:<domain>:<n> (e.g. "
                   "organism:aligned:money:120)")
    p.add_argument("--steps", type=int, default=35, help="optimiser steps (default 35)")
    p.add_argument("--lr", type=float, default=3e-4, help="learning rate (default 3e-4)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per step (default 8)")
    p.add_argument("--params", default="all",
                   help="which parameters train: all (default), mlp, attn, layers:0,2, or a name prefix")
    p.add_argument("--track", default="",
                   help="comma-separated features to track: sae:DIR#LATENT, direction:FILE")
    p.add_argument("--track-positions", default="last", choices=["all", "prompt", "response", "last"],
                   help="positions the tracked features are read at (default last: the answer position)")
    p.add_argument("--eval-prompts", metavar="SPEC", help="scoring prompts (default: the model's default evaluation set, see above)")
    p.add_argument("--eval-every", type=int, default=5, help="evaluate every k steps (default 5)")
    p.add_argument("--checkpoint-every", type=int, default=None, help="also save a checkpoint every k steps")
    p.add_argument("--seed", type=int, default=0, help="data-order seed (the run is deterministic for it)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    add_device_args(p)
    add_output_args(p, out_required=True)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from misfeat.features.probes import parse_probe
    from misfeat.finetune import RealignConfig, plot_realign, realign
    from misfeat.io import PLOT_FILE
    from misfeat.models import load_model
    from misfeat.specs import split_specs

    tracked = split_specs(args.track) if args.track else []
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    probes = [parse_probe(s, args.track_positions) for s in tracked]
    for probe in probes:
        if hasattr(probe, "sae"):
            probe.sae.to(model.cfg.device)
    cfg = RealignConfig(steps=args.steps, lr=args.lr, batch_size=args.batch_size, params=args.params,
                        eval_every=args.eval_every, checkpoint_every=args.checkpoint_every, seed=args.seed)
    result = realign(model, args.data, cfg, eval_prompts=args.eval_prompts, track=probes, out_dir=args.out,
                     resume=args.resume)
    plot_realign(result, Path(args.out) / PLOT_FILE, title=f"realign {args.model} on {args.data}")
    from dataclasses import asdict

    summary = {"model": args.model, "data": args.data, "config": asdict(cfg), **result.summary()}
    finish(args, summary, result.table())
    return 0
