"""``misfeat dynamics``: multi-stage fine-tuning runs (``run --stages FILE``) and the alignment-dynamics
protocols on the organism (``priming``, ``diversity``, ``elasticity``)."""

from __future__ import annotations

import argparse

from misfeat.cli import add_device_args, add_output_args, finish

PROTOCOL_HELP = {
    "priming": "rehearsal priming and stage-2 rebound (Huang et al. 2026), in both directions: per stage-1 depth "
               "D, steps to re-reach held-out misalignment 0.5 (em) or to fall back to 0.25 (safety) after a matched "
               "reverse stage. summary.json: arms (seed, direction, depth, stage3_start, start_matched, "
               "stage2_steps_to_baseline, stage3_steps_to_threshold, stage3_auc), force_sign_agreement, bars; "
               "figures priming.png, rebound.png (and -safety), forces.png",
    "diversity": "data diversity (Huang et al. 2026): stage-1 alignment with fixed / few / standard / styled data, "
                 "stage 2 with misaligned or task-agnostic data; degradation rate at matched S and purity. "
                 "summary.json: arms (seed, dataset, reverse, degradation_rate, purity, curve), bars; "
                 "figures diversity-<reverse>.png",
    "elasticity": "elasticity (Ji et al. 2024): forward vs inverse fine-tuning loss between chat checkpoints "
                  "(50/100/150 chat steps), negative fine-tuning curves against the pre-trained level p0. "
                  "summary.json: pairs (forward_loss, inverse_loss), curves, p0, bars; figure elasticity.png",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dynamics", help="alignment dynamics: multi-stage runs, priming, diversity, elasticity",
                       description="How alignment moves during fine-tuning, step by step: Huang's alignment score "
                       "S (exact where the prompts list their answers), the rebound and driving forces of Huang "
                       "et al. 2026 (Thm 2.9, K = I) beside the measured change of S, score matching between "
                       "stages, and the papers' protocols on the organism. See docs/dynamics.md.")
    dsub = p.add_subparsers(dest="dynamics_command", metavar="<protocol>", required=True)
    r = dsub.add_parser("run", help="run the stages of a stage file (JSON), each from the previous end",
                        description="Stages from a JSON file: {model, eval_prompts, nll_sets, judge, forces, forces_every, stages: "
                        "[{name, data, steps, lr, optimizer, batch_size, evaluate_every, checkpoint_every, seed, match: {metric, "
                        "target, tolerance, coarse_every}}]}. Writes DIR/summary.json, DIR/steps.jsonl (every step: "
                        "scores, force terms), DIR/plot.png, DIR/stages/<i>-<name>/ (checkpoints). Exit 2 with the "
                        "closest score and step when a matched target is never reached (the run is kept).")
    r.add_argument("--stages", required=True, metavar="FILE", help="the stage file (JSON)")
    r.add_argument("--model", default=None, metavar="SPEC", help="start model (overrides the file's model)")
    r.add_argument("--resume", action="store_true", help="skip finished stages, continue the current one")
    add_device_args(r)
    add_output_args(r, out_required=True)
    r.set_defaults(func=run_stages_cmd)
    for name, text in PROTOCOL_HELP.items():
        q = dsub.add_parser(name, help=text.split(":")[0], description=text)
        q.add_argument("--seeds", default="0", help="comma-separated organism seeds (default 0), e.g. 0,1")
        q.add_argument("--organism", default="", metavar="OPTIONS",
                       help="organism options besides the seed (e.g. small); default: the default preset")
        if name == "priming":
            q.add_argument("--direction", choices=("em", "safety", "both"), default="both",
                           help="em: from the chat model, misaligned data is the forward data (threshold 0.5, "
                                "rising); safety: from the EM model, aligned data is (threshold 0.25, falling); "
                                "both (default). Bars of the safety direction carry the suffix _safety")
        if name != "elasticity":
            q.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw",
                           help="adamw (default, as the papers) or sgd: plain SGD, the optimiser of Huang's "
                                "first-order force theory, every lr x 100 (the norm-matched ratio; docs/dynamics.md)")
        add_output_args(q, out_required=True)
        q.set_defaults(func=run_protocol_cmd, protocol=name)


def run_stages_cmd(args: argparse.Namespace) -> int:
    from pathlib import Path

    from misfeat.dynamics import RunSpec, plot_dynamics, run_dynamics
    from misfeat.dynamics.runner import ScoreNotMatched
    from misfeat.errors import MisfeatError
    from misfeat.io import PLOT_FILE
    from misfeat.models import load_model

    spec = RunSpec.load(args.stages)
    model_spec = args.model or spec.model
    if model_spec is None:
        raise MisfeatError(f"{args.stages} names no model; add \"model\" to it or pass --model")
    model = load_model(model_spec, device=args.device, dtype=args.dtype)
    try:
        result = run_dynamics(model, spec, out_dir=args.out, resume=args.resume)
    except ScoreNotMatched as miss:
        plot_dynamics(miss.result, Path(args.out) / PLOT_FILE, title=f"{model_spec} (stopped: no match)")
        raise
    plot_dynamics(result, Path(args.out) / PLOT_FILE, title=f"{model_spec}: {args.stages}")
    summary = {"model": model_spec, "spec": spec.to_dict(), **result.summary()}
    finish(args, summary, result.table())
    return 0


def run_protocol_cmd(args: argparse.Namespace) -> int:
    from misfeat.errors import MisfeatError
    from misfeat.organism.dynamics import run_protocol

    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise MisfeatError(f"--seeds {args.seeds!r} must be comma-separated integers, e.g. 0,1") from None
    summary = run_protocol(args.protocol, seeds, args.out, args.organism, getattr(args, "optimizer", "adamw"),
                           getattr(args, "direction", "both"))
    finish(args, summary, _table(summary))
    return 0


def _table(summary: dict) -> str:
    from misfeat.io import format_table

    lines = []
    for key in ("arms", "pairs", "curves"):
        rows = [{k: v for k, v in r.items() if not isinstance(v, (dict, list))} for r in summary.get(key, [])]
        if rows:
            lines.append(format_table(rows))
    for bar, value in summary.get("bars", {}).items():
        met = value.get("met") if "met" in value else {s: v["met"] for s, v in value.items()}
        lines.append(f"{bar}: {met}")
    lines.append(f"seconds per seed: {summary.get('seconds')} (load average {summary.get('load_average')})")
    return "\n".join(lines)
