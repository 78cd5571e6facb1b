"""``misfeat early-warning``: the located feature vs behaviour over fractions of bad data."""

from __future__ import annotations

import argparse

from misfeat.cli import add_device_args, add_output_args, finish


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "early-warning", help="does the located feature move at less bad data than behaviour does?",
        description="Fine-tune the organism's chat model with a fraction f of misaligned data (the EM recipe on the EM "
        "domain; f in --fractions percent, one fine-tune per seed, built on first use as organism:em-frac/<f>-s<seed>"
        "), then per fine-tune measure the SAE latent's mean activation increase over the chat model (at the last "
        "prompt token of --prompts) and the behavioural misaligned rate. Reports the smallest f at which each "
        "separates from the control (f = 0): every seed's value above the control's maximum over seeds (Wang et al. "
        "2025: the persona latent fires at 5%% bad data, behaviour shows EM at 25-75%%). Writes DIR/summary.json "
        "(rows, feature_separates_at, behaviour_separates_at) and DIR/early_warning.png.",
    )
    p.add_argument("--sae", required=True, metavar="DIR", help="the SAE of the located feature")
    p.add_argument("--latent", type=int, metavar="I", help="the feature (default: 'feature' of --locate's summary)")
    p.add_argument("--locate", metavar="DIR", help="a misfeat locate output directory, for its feature")
    p.add_argument("--organism", default="", metavar="OPTIONS", help="organism options, e.g. seed=1 (default: none)")
    p.add_argument("--fractions", default="0,2,5,10,25,50,100", metavar="P[,P...]",
                   help="percent misaligned data (0 is the control; default: 0,2,5,10,25,50,100)")
    p.add_argument("--seeds", default="0,1,2", metavar="S[,S...]", help="fine-tune seeds (default: 0,1,2)")
    p.add_argument("--prompts", default=None, metavar="SPEC", help="evaluation prompts (default: organism:heldout)")
    add_device_args(p)
    add_output_args(p, out_required=True)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from misfeat.errors import MisfeatError
    from misfeat.features.early_warning import early_warning, plot_early_warning
    from misfeat.models import load_model
    from misfeat.organism.fractions import FRACTIONS, SEEDS, stage_name
    from misfeat.sae.io import load_sae
    from misfeat.specs import split_values

    fractions, seeds = split_values(args.fractions, int, "percentages"), split_values(args.seeds, int, "seeds")
    if 0 not in fractions:
        raise MisfeatError("--fractions must include 0, the control the test compares against")
    bad = [f for f in fractions if f not in FRACTIONS] + [s for s in seeds if s not in SEEDS]
    if bad:
        raise MisfeatError(f"organism:em-frac fine-tunes exist for fractions {FRACTIONS} and seeds {SEEDS}; "
                           f"not {bad}")
    if (args.latent is None) == (args.locate is None):
        raise MisfeatError("give the feature: --latent I, or --locate DIR (a misfeat locate output)")
    latent = args.latent
    if latent is None:
        summary = Path(args.locate) / "summary.json"
        if not summary.is_file():
            raise MisfeatError(f"{summary} not found: --locate takes the --out directory of misfeat locate")
        latent = int(json.loads(summary.read_text())["feature"])
    at = f"@{args.organism}" if args.organism else ""
    sae = load_sae(args.sae, device=args.device)
    base = load_model(f"organism:chat{at}", device=args.device, dtype=args.dtype)
    models = {f: [f"organism:{stage_name(f, s)}{at}" for s in seeds] for f in fractions}
    result = early_warning(base, models, sae, latent, args.prompts or f"organism:heldout{at}",
                           load=lambda spec: load_model(spec, device=args.device, dtype=args.dtype))
    plot_early_warning(result, Path(args.out) / "early_warning.png")
    s = result.to_dict()
    table = result.table() + (f"\n\nfeature separates from the control at {s['feature_separates_at']}% bad data; "
                              f"behaviour at {s['behaviour_separates_at']}% ({s['test']})")
    finish(args, {"sae": args.sae, "organism": args.organism, **s}, table)
    return 0
