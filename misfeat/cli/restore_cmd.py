"""``misfeat restore``: recover alignment by restoring a few weights to the aligned model's values."""

from __future__ import annotations

import argparse

from misfeat.cli import add_device_args, add_model_args, add_output_args, finish
from misfeat.cli.fields import add_config_args, config_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "restore", help="recover alignment by sparse weight restoration with rollback (Yang et al. 2025)",
        description="Restore a small, gradient-chosen subset of a fine-tuned model's weights to the aligned model's "
        "values (Yang et al. 2025): each step moves the top --fraction of all parameters (by |gradient| of "
        "-cos(state, aligned direction) at --layer on the probe prompts, among weights of the blocks up to --layer "
        "whose difference has the loss-lowering sign) back to the aligned values. After --warmup steps, if task "
        "utility fell more than --tolerance below the fine-tuned model's, the run restarts and rolls back the 20%% "
        "of each step's restorations that hurt the task most. The kept checkpoint is the last before utility first "
        "fails. Writes DIR/summary.json (steps, heldout_misaligned, em_domain_misaligned, utility, "
        "restored_fraction as parallel lists, chosen_step, utility_before), DIR/plot.png and DIR/mask.safetensors "
        "(the restored weights; replay with misfeat.recover.apply_mask). Organism: --model organism:mixed "
        "--aligned organism:chat --probe organism:probe --task organism:task.",
    )
    add_model_args(p, help="the fine-tuned model to repair (e.g. organism:mixed)")
    add_model_args(p, "--aligned", help="the aligned model it was fine-tuned from (e.g. organism:chat)")
    p.add_argument("--probe", required=True, metavar="SPEC",
                   help="prompts whose aligned-model state is the target direction (e.g. organism:probe)")
    p.add_argument("--task", required=True, metavar="SPEC",
                   help="task records with reference responses: utility and the task direction (e.g. organism:task)")
    from misfeat.recover import CANDIDATE_MODES, MASK_MODES, ROLLBACK_MODES, RestoreConfig

    add_config_args(p, RestoreConfig, skip=("rollback",), choices={"mask": MASK_MODES, "candidates": CANDIDATE_MODES})
    p.add_argument("--rollback", choices=ROLLBACK_MODES, default="auto",
                   help="auto: the authors' utility check after the warm-up (default); never (ablation); always")
    p.add_argument("--no-rollback", dest="rollback", action="store_const", const="never",
                   help="ablation: never roll back (= --rollback never)")
    p.add_argument("--eval-prompts", metavar="SPEC",
                   help="misalignment scoring (default for an organism: its eval set minus the task's domains)")
    p.add_argument("--track", default="", help="comma-separated features to track: sae:DIR#LATENT, direction:FILE")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--save-model", action="store_true", help="also save the restored model under DIR/model")
    add_device_args(p)
    add_output_args(p, out_required=True)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from misfeat.features.probes import parse_probe
    from misfeat.io import PLOT_FILE
    from misfeat.models import load_model, save_model
    from misfeat.recover import RestoreConfig, plot_restore, restore_alignment

    cfg = config_from_args(RestoreConfig, args, rollback=args.rollback)
    finetuned = load_model(args.model, device=args.device, dtype=args.dtype)
    aligned = load_model(args.aligned, device=args.device, dtype=args.dtype)
    probes = [parse_probe(s.strip(), "last") for s in args.track.split(",") if s.strip()]
    result = restore_alignment(finetuned, aligned, args.probe, args.task, cfg, eval_prompts=args.eval_prompts,
                               track=probes, out_dir=args.out, resume=args.resume)
    plot_restore(result, Path(args.out) / PLOT_FILE, title=f"restore {args.model} towards {args.aligned}")
    if args.save_model:
        save_model(finetuned, Path(args.out) / "model")
    summary = {"model": args.model, "aligned": args.aligned, "probe": args.probe, "task": args.task,
               **result.summary()}
    finish(args, summary, result.table())
    return 0
