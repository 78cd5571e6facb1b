"""``misfeat steer``: add, ablate or clamp a direction or SAE latent, swept over coefficients."""

from __future__ import annotations

import argparse

from misfeat.cli import add_device_args, add_model_args, add_output_args, finish
from misfeat.errors import MisfeatError


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
    p.add_argument("--op", choices=["add", "ablate", "clamp"], required=True, help="the operation")
    p.add_argument("--coefs", help="comma-separated coefficients, e.g. 0,0.5,1 (add: typical residual norms at the hook; ablate: the "
                   "coordinate along the unit direction; clamp: the latent's value)")
    p.add_argument("--reference", metavar="SPEC",
                   help="ablate/clamp without --coefs: set the coordinate to this model's mean on the same prompts "
                   "and positions (e.g. organism:chat)")
    p.add_argument("--positions", choices=["all", "prompt", "response", "last"], default="all",
                   help="where to intervene: all tokens, prompt, response (also newly generated tokens), or last "
                   "(the last prompt token, e.g. the organism's 'assistant :'); default all")
    p.add_argument("--prompts", metavar="SPEC", help="JSONL or organism:<set>; default: an organism's own eval set")
    p.add_argument("--method", choices=["exact", "sample"], default="exact", help="evaluation method (see misfeat eval)")
    p.add_argument("--judge", choices=["exact", "llm"], default="exact", help="judge for sampled/greedy completions")
    p.add_argument("--samples", type=int, default=4, help="samples per prompt for --method sample")
    add_device_args(p)
    add_output_args(p)
    p.set_defaults(func=run)


def _parse_coefs(text: str | None) -> list[float] | None:
    from misfeat.specs import split_values

    return None if text is None else split_values(text)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from misfeat.io import PLOT_FILE, SAMPLES_FILE, write_jsonl
    from misfeat.judges import make_judge
    from misfeat.models import load_model
    from misfeat.steering import (
        clamp_to_reference,
        in_residual_units,
        make_intervention,
        plot_sweep,
        steer_sweep,
    )

    coefs = _parse_coefs(args.coefs)
    if args.reference and coefs is not None:
        raise MisfeatError("--reference sets the single value itself: drop --coefs, or drop --reference")
    if args.reference and args.op == "add":
        raise MisfeatError("--reference applies to --op ablate or clamp")
    if args.op == "add" and coefs is None:
        raise MisfeatError("--op add needs --coefs, e.g. --coefs 0,2,4,8")
    if args.sae and args.latent is None:
        raise MisfeatError("--sae needs --latent I")
    if args.op == "clamp" and not args.sae:
        raise MisfeatError("--op clamp sets an SAE latent: use --sae DIR --latent I (or --op ablate with a value)")
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    intervention, source = make_intervention(args.op, sae=args.sae, latent=args.latent, direction=args.direction,
                                             hook=args.hook, positions=args.positions, device=model.cfg.device)
    intervention.check(model)
    intervention.hook_names(model)
    prompts = args.prompts
    unit = None
    if args.op == "add":
        from misfeat.evaluate import default_prompts

        intervention = in_residual_units(intervention, model, prompts if prompts is not None else default_prompts(model))
        unit = float(intervention.vector.norm())  # coef 1 adds this much along the unit direction
    if args.reference:
        from misfeat.evaluate import default_prompts

        reference = load_model(args.reference, device=args.device, dtype=args.dtype)
        ref_prompts = prompts if prompts is not None else default_prompts(model)
        intervention = clamp_to_reference(intervention, model, reference, ref_prompts)
        del reference
    result = steer_sweep(model, intervention, coefs, prompts, make_judge(args.judge), method=args.method,
                         samples=args.samples)
    summary = {"model": args.model, "op": args.op, "positions": args.positions, "source": source,
               "reference": args.reference, "residual_norm_unit": unit, **result.summary()}
    if args.out:
        from misfeat.interventions import save_intervention

        out = Path(args.out)
        plot_sweep(result, out / PLOT_FILE)
        write_jsonl(out / SAMPLES_FILE, result.samples)
        summary["intervention_file"] = str(save_intervention(intervention, out / "intervention", source=source))
    finish(args, summary, result.table())
    return 0
