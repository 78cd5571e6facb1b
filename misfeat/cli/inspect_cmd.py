"""``misfeat inspect``: what a model spec and a prompt set resolve to, before a long run."""

from __future__ import annotations

import argparse

from misfeat.cli import add_device_args, add_model_args, add_output_args, finish


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect", help="show a model's architecture, hook names and a prompt set's statistics",
        description="Load a model (and optionally a prompt set) and report what misfeat sees: "
        "architecture, hook names, chat format, fingerprint; prompt counts, domains and token lengths. "
        "Use it to check a local model directory or a prompt file before a long run.",
    )
    add_model_args(p)
    p.add_argument("--prompts", metavar="SPEC", help="a JSONL prompt file or organism:<set> to validate and tokenise")
    add_device_args(p)
    add_output_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from misfeat.inspect import describe_model, describe_prompts
    from misfeat.io import format_table
    from misfeat.models import load_model

    model = load_model(args.model, device=args.device, dtype=args.dtype)
    summary = {"model": describe_model(model)}
    rows = [{"field": k, "value": v} for k, v in summary["model"].items() if k != "hooks"]
    if args.prompts:
        from misfeat.data import load_prompts

        summary["prompts"] = describe_prompts(load_prompts(args.prompts), model)
        rows += [{"field": f"prompts.{k}", "value": v} for k, v in summary["prompts"].items()]
    finish(args, summary, format_table(rows, ["field", "value"]))
    return 0
