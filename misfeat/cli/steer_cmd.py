"""``misfeat steer``: add, ablate or clamp a direction or SAE latent, swept over coefficients."""

from __future__ import annotations

import argparse

from misfeat.cli import add_device_args, add_model_args, add_output_args, finish
from misfeat.cli.fields import add_config_args, config_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "steer", help="steer, ablate or clamp a feature and measure misalignment per coefficient",
        description="Apply an intervention to a model and evaluate misalignment at each coefficient. The feature "
        "is an SAE latent (--sae DIR --latent I: its decoder row) or a direction file (--direction FILE: a saved "
        "misfeat direction/intervention, which carries its hook; raw .pt/.npy/.safetensors vectors need --hook). "
        "Ops: add (add coef x the unit direction x the mean L2 norm of the model's activations at the hook over the "
        "steered positions of --prompts: coefs count typical residual norms, the units of locate's --coefs and the "
        "demo's --steer-coefs), ablate (set the coordinate along the unit direction to coef; without --coefs "
        "project it out, i.e. set it to 0, or to the --reference model's mean coordinate), clamp (set the SAE "
        "latent to coef; without --coefs to 0, or to the --reference model's mean activation). Writes "
        "DIR/summary.json (rows: coef, misaligned_rate, valid_rate, logprob_gap), DIR/plot.png, DIR/samples.jsonl "
        "and the intervention itself (DIR/intervention.safetensors + .json).",
    )
    add_model_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--sae", metavar="DIR", help="an SAE in SAELens format (cfg.json + sae_weights.safetensors)")
    src.add_argument("--direction", metavar="FILE", help="a saved direction/intervention, or a raw vector file")
    p.add_argument("--latent", type=int, help="the SAE latent (with --sae)")
    p.add_argument("--hook", help="hook for a raw vector, e.g. blocks.1.hook_resid_post; 'all' (ablate only) "
                   "means the residual stream of every layer")
    p.add_argument("--reference", metavar="SPEC",
                   help="ablate/clamp without --coefs: set the coordinate to this model's mean on the same prompts "
                   "and positions (e.g. organism:chat)")
    p.add_argument("--prompts", metavar="SPEC", help="JSONL or <plug-in>:<set>; default: the model's plug-in's own "
                   "eval set (an organism's)")
    p.add_argument("--judge", choices=["exact", "llm"], default="exact", help="judge for sampled/greedy completions")
    from misfeat.data import POSITIONS
    from misfeat.evaluate import METHODS
    from misfeat.interventions import OPS
    from misfeat.steering import SteerConfig

    add_config_args(p, SteerConfig, choices={"op": OPS, "positions": POSITIONS, "method": METHODS})
    add_device_args(p)
    add_output_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from misfeat.interventions import save_intervention
    from misfeat.io import PLOT_FILE, SAMPLES_FILE, write_jsonl
    from misfeat.judges import make_judge
    from misfeat.models import load_model
    from misfeat.steering import SteerConfig, check_steer, plot_sweep, steer

    cfg = config_from_args(SteerConfig, args)
    feature = {"sae": args.sae, "latent": args.latent, "direction": args.direction}
    check_steer(cfg, **feature, reference=args.reference)
    judge = make_judge(args.judge)
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    reference = load_model(args.reference, device=args.device, dtype=args.dtype) if args.reference else None
    result = steer(model, cfg, **feature, hook=args.hook, prompts=args.prompts, reference=reference, judge=judge)
    summary = {"model": args.model, "reference": args.reference, **result.to_dict()}
    if args.out:
        out = Path(args.out)
        plot_sweep(result.sweep, out / PLOT_FILE)
        write_jsonl(out / SAMPLES_FILE, result.sweep.samples)
        summary["intervention_file"] = str(save_intervention(result.intervention, out / "intervention",
                                                             source=result.source))
    finish(args, summary, result.sweep.table())
    return 0
