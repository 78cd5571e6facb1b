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
        "Ops: add (add coef x the direction, coefs are in units of the direction's norm: 1 adds it once; an SAE "
        "decoder row has norm 1), ablate (set the coordinate along the unit direction to coef; without --coefs "
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
    p.add_argument("--coefs", help="comma-separated coefficients, e.g. 0,2,4,8 (see the op's meaning above)")
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
    if text is None:
        return None
    try:
        return [float(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise MisfeatError(f"--coefs {text!r}: expected comma-separated numbers, e.g. 0,2,4,8") from None


def _load_vector(path: str, hook: str | None):
    """(vector, hook, source) from a saved direction or a raw vector file."""
    from pathlib import Path

    import torch

    from misfeat.interventions import read_intervention

    p = Path(path)
    if not p.exists():
        raise MisfeatError(f"--direction {path}: no such file")
    if p.suffix == ".safetensors" or p.suffix == ".json":
        try:
            record, vector = read_intervention(p)
            return vector, hook or record.get("hook") or record.get("hooks"), {"kind": "direction", "path": str(p)}
        except MisfeatError as err:
            if "not a saved misfeat" not in str(err):
                raise
            from safetensors.torch import load_file

            tensors = load_file(str(p))
            if len(tensors) != 1:
                raise MisfeatError(f"{path} holds {len(tensors)} tensors; a raw direction file holds one") from None
            vector = next(iter(tensors.values()))
    elif p.suffix == ".npy":
        import numpy as np

        vector = torch.from_numpy(np.load(p))
    elif p.suffix in (".pt", ".pth"):
        vector = torch.load(p, map_location="cpu", weights_only=True)
    else:
        raise MisfeatError(f"--direction {path}: use a .safetensors (saved by misfeat, or one tensor), .pt or .npy")
    if not isinstance(vector, torch.Tensor) or vector.dim() != 1:
        raise MisfeatError(f"{path} must hold one 1-D vector, found shape {getattr(vector, 'shape', None)}")
    if hook is None:
        raise MisfeatError(f"{path} is a raw vector with no hook: pass --hook, e.g. blocks.1.hook_resid_post")
    return vector.float(), hook, {"kind": "direction", "path": str(p)}


def build_intervention(args, model):
    """The intervention the arguments describe (coefficient not yet applied) and its source record."""
    from misfeat.interventions import Ablate, Add, ClampLatent, load_sae_dir

    if args.sae:
        if args.latent is None:
            raise MisfeatError("--sae needs --latent I")
        sae = load_sae_dir(args.sae).to(model.cfg.device)
        source = {"kind": "sae", "path": args.sae, "latent": args.latent}
        if not 0 <= args.latent < sae.cfg.d_sae:
            raise MisfeatError(f"--latent {args.latent} out of range: the SAE has {sae.cfg.d_sae} latents")
        hook = args.hook or sae.cfg.metadata.hook_name
        vector = sae.W_dec[args.latent].detach().float()
        if args.op == "clamp":
            return ClampLatent(sae, args.latent, 0.0, args.positions), source
    else:
        if args.op == "clamp":
            raise MisfeatError("--op clamp sets an SAE latent: use --sae DIR --latent I (or --op ablate with a value)")
        vector, hook, source = _load_vector(args.direction, args.hook)
    if args.op == "add":
        if hook == "all":
            raise MisfeatError("--hook all is only for --op ablate")
        return Add(hook, vector, 1.0, args.positions), source
    return Ablate(hook, vector, None, args.positions), source


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from misfeat.io import PLOT_FILE, SAMPLES_FILE, write_jsonl
    from misfeat.judges import make_judge
    from misfeat.models import load_model
    from misfeat.steering import (
        plot_sweep,
        reference_coordinates,
        reference_latent,
        reference_responses,
        steer_sweep,
    )

    coefs = _parse_coefs(args.coefs)
    if args.reference and coefs is not None:
        raise MisfeatError("--reference sets the single value itself: drop --coefs, or drop --reference")
    if args.reference and args.op == "add":
        raise MisfeatError("--reference applies to --op ablate or clamp")
    if args.op == "add" and coefs is None:
        raise MisfeatError("--op add needs --coefs, e.g. --coefs 0,2,4,8")
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    intervention, source = build_intervention(args, model)
    intervention.check(model)
    intervention.hook_names(model)
    prompts = args.prompts
    reference_note = None
    if args.reference:
        from misfeat.evaluate import default_prompts

        reference = load_model(args.reference, device=args.device, dtype=args.dtype)
        ref_prompts, reference_note = reference_responses(
            reference, prompts if prompts is not None else default_prompts(model), args.positions)
        if args.op == "clamp":
            value = reference_latent(reference, ref_prompts, intervention.sae, intervention.latent, args.positions)
            intervention = intervention.with_coef(value)
        else:
            values = reference_coordinates(reference, ref_prompts, intervention.hook_names(model),
                                           intervention.direction, args.positions)
            import dataclasses

            intervention = dataclasses.replace(intervention, value=values)
        del reference
    result = steer_sweep(model, intervention, coefs, prompts, make_judge(args.judge), method=args.method,
                         samples=args.samples)
    summary = {"model": args.model, "op": args.op, "positions": args.positions, "source": source,
               "reference": args.reference, **result.summary()}
    if reference_note:
        summary["reference_note"] = reference_note
    if args.out:
        from misfeat.interventions import save_intervention

        out = Path(args.out)
        plot_sweep(result, out / PLOT_FILE)
        write_jsonl(out / SAMPLES_FILE, result.samples)
        summary["intervention_file"] = str(save_intervention(intervention, out / "intervention", source=source))
    finish(args, summary, result.table())
    return 0
