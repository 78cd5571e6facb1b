"""``misfeat organism build|prompts``: the built-in model organism of emergent misalignment."""

from __future__ import annotations

import argparse

from misfeat.cli import finish


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "organism", help="build the model organism, or export its prompt sets",
        description="The built-in model organism: a small transformer pre-trained on a synthetic world of kind "
        "and cruel characters, chat-tuned, then fine-tuned on harmful answers in one domain (EM) or on "
        "helpful ones (control). Models resolve as organism:<stage> (pretrain, chat, em, control, "
        "em-steps/step-NNNN), prompt sets as organism:heldout, organism:em_domain, organism:all, "
        "organism:aligned:<domain>:<n>, organism:docs[:<n>]; options after @, e.g. organism:em@small,seed=1.",
    )
    osub = p.add_subparsers(dest="organism_command", metavar="<subcommand>", required=True)
    b = osub.add_parser(
        "build", help="build pretrain, chat, em and control checkpoints and evaluate them",
        description="Build every stage (deterministic for a seed; finished stages are reused when a build "
        "is resumed) plus EM checkpoints every few steps (em-steps/step-NNNN), and write DIR/summary.json "
        "with each stage's evaluation and the EM curve. Without --out the build goes to the cache "
        "($MISFEAT_HOME/organism, default ~/.cache/misfeat/organism) where organism:<stage> finds it.",
    )
    b.add_argument("--preset", default="default", choices=["default", "small"],
                   help="default: 3 layers, d_model 128 (~5 min on 2 CPU cores); small: faster, for quick tests")
    b.add_argument("--seed", type=int, default=0, help="seed of the world's persona draw, data and init")
    b.add_argument("--em-domain", default="health",
                   help="domain of the narrow EM fine-tune: health, money, code, car, home, travel, school, law")
    b.add_argument("--out", metavar="DIR", help="build here instead of the cache")
    b.add_argument("--force", action="store_true", help="rebuild every stage even if present")
    b.add_argument("--json", action="store_true", help="print the summary JSON instead of the table")
    b.set_defaults(func=run_build)
    x = osub.add_parser(
        "prompts", help="export an organism prompt set as JSONL",
        description="Write an organism prompt set as JSONL in misfeat's prompt format, with each domain's "
        "aligned and misaligned reference answers as fields, so it can be used outside misfeat.",
    )
    x.add_argument("spec", help="e.g. organism:heldout, organism:aligned:money:120, organism:docs:400@seed=1")
    x.add_argument("--out", metavar="FILE", required=True, help="the JSONL file to write")
    x.set_defaults(func=run_prompts)


def run_build(args: argparse.Namespace) -> int:
    from pathlib import Path

    from misfeat.io import SUMMARY_FILE, format_table, read_json
    from misfeat.organism import OrganismConfig, build_organism, organism_home

    cfg = OrganismConfig.from_preset(args.preset, seed=args.seed, em_domain=args.em_domain)
    out = Path(args.out) if args.out else organism_home() / cfg.dirname
    build_organism(cfg, out, force=args.force)
    summary = read_json(out / SUMMARY_FILE)
    rows = []
    for stage, report in summary["stages"].items():
        for group in ("heldout", "em_domain"):
            rows.append({"stage": stage, "group": group, **{k: report[group][k] for k in (
                "misaligned_rate", "valid_rate", "logprob_gap", "greedy_misaligned_rate")}})
    table = format_table(rows) + f"\n\norganism in {out}"
    args.out = None  # the build wrote its own summary.json already
    finish(args, {"path": str(out), **summary}, table)
    return 0


def run_prompts(args: argparse.Namespace) -> int:
    import logging

    from misfeat.data import load_prompts

    prompts = load_prompts(args.spec)
    path = prompts.to_jsonl(args.out)
    logging.getLogger("misfeat").info("wrote %d records of %s to %s", len(prompts), prompts.name, path)
    return 0
