"""``misfeat finetune`` (the fine-tuning engine with defences), ``misfeat score-data`` (the
perplexity-gap ranking of a safe pool) and ``misfeat screen-data`` (projection-difference
screening of fine-tuning data)."""

from __future__ import annotations

import argparse

from misfeat.cli import add_device_args, add_model_args, add_output_args, finish
from misfeat.cli.fields import add_config_args, config_from_args
from misfeat.finetune.engine import FinetuneConfig
from misfeat.finetune.specs import SPEC_HELP
from misfeat.specs import split_specs


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune", help="fine-tune with in-training defences (KL, LDIFS, steering, CAFT, inoculation, interleave)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune a model on records with responses (cross-entropy on response tokens only), with "
        "any defences against emergent misalignment (Kaczer et al. 2025; Chen et al. 2025). Logs every step's "
        "loss and each defence's term, evaluates every --eval-every steps, checkpoints under DIR/checkpoints/, "
        "stops with a non-zero exit when the loss diverges (the last good checkpoint kept). Writes DIR/summary."
        "json (config, defences, steps, metrics, loss, terms), DIR/rows.jsonl and DIR/run.json.\n\n" + SPEC_HELP)
    add_model_args(p)
    p.add_argument("--data", required=True, metavar="SPEC",
                   help="records with responses: a JSONL file or organism:misaligned:<domain>:<n>")
    p.add_argument("--defence", action="append", default=[], metavar="SPEC", help="a defence (see above)")
    add_config_args(p, FinetuneConfig)
    p.add_argument("--eval-prompts", metavar="SPEC", help="prompts scored every --eval-every steps (e.g. "
                   "organism:heldout); without it only the loss is logged")
    p.add_argument("--track", default="", help="comma-separated features to track: sae:DIR#LATENT, direction:FILE")
    p.add_argument("--resume", action="store_true", help="continue the run in --out (refused if it is another run)")
    add_device_args(p)
    add_output_args(p, out_required=True)
    p.set_defaults(func=run)

    s = sub.add_parser(
        "score-data", help="rank a safe pool by the perplexity gap between aligned and misaligned models",
        description="s_d = (mean_k NLL_misaligned_k(d) - NLL_aligned(d)) / (NLL_aligned(d) + eps), NLL per "
        "answer token with the prompt masked (Kaczer et al. 2025, Interleaving+). Writes DIR/ranked.jsonl (the "
        "pool, highest s_d first, each record with gap_score) and DIR/summary.json.")
    add_model_args(s, "--aligned", help="the aligned model (spec)")
    s.add_argument("--misaligned", required=True, help="comma-separated misaligned model specs")
    s.add_argument("--pool", required=True, metavar="SPEC", help="records with responses (JSONL or organism set)")
    s.add_argument("--hold-out", default="", help="comma-separated misaligned specs left out of the mean")
    s.add_argument("--eps", type=float, default=1.0, help="eps of s_d (default 1.0)")
    s.add_argument("--top-n", type=int, default=None, help="keep only the top N")
    s.add_argument("--filter", choices=["none", "refusal"], default="none",
                   help="refusal: drop refusals first (Interleaving++)")
    add_device_args(s)
    add_output_args(s, out_required=True)
    s.set_defaults(func=run_score)

    c = sub.add_parser(
        "screen-data", help="rank fine-tuning data by projection difference along a direction, flag samples",
        description="Chen et al. 2025 data screening: per sample (a(x,y) - a(x,y')) . v_hat, a the mean activation "
        "over response tokens at the direction's hook, y' the model's own answer (its most probable answer when "
        "the record lists aligned/misaligned answers, else its greedy completion); --mode last_prompt uses the "
        "cheap variant a(x,y) . v_hat - h_last_prompt(x) . v_hat. Writes DIR/ranked.jsonl (records, highest "
        "first, with projection_difference and flagged) and DIR/summary.json (dataset_score, n_flagged, top).")
    add_model_args(c)
    c.add_argument("--data", required=True, action="append", metavar="SPEC",
                   help="records with responses (JSONL or organism set); repeat to compare datasets by their "
                   "dataset score (each ranked into DIR/ranked-<i>.jsonl)")
    c.add_argument("--direction", required=True, metavar="FILE", help="a saved misfeat direction (carries its hook)")
    c.add_argument("--hook", default=None, help="override the direction's hook")
    c.add_argument("--mode", choices=["own", "expected", "last_prompt"], default="own",
                   help="y' = the model's own answer (default); expected: the exact expectation over the record's "
                   "listed answers; last_prompt: the last-prompt-token approximation")
    c.add_argument("--threshold", type=float, default=0.0, help="flag samples scoring above this (default 0)")
    add_device_args(c)
    add_output_args(c, out_required=True)
    c.set_defaults(func=run_screen)


def run(args: argparse.Namespace) -> int:
    from misfeat.features.probes import parse_probe
    from misfeat.finetune import finetune
    from misfeat.finetune.specs import parse_defence, split_spec
    from misfeat.models import load_model

    cfg = config_from_args(FinetuneConfig, args)
    for spec in args.defence:  # syntax errors before any model is loaded
        split_spec(spec)
    tracked = split_specs(args.track) if args.track else []
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    references: dict = {}
    defences = [parse_defence(spec, model=args.model, device=args.device, dtype=args.dtype, references=references)
                for spec in args.defence]
    probes = [parse_probe(s, "last") for s in tracked]
    for probe in probes:
        if hasattr(probe, "sae"):
            probe.sae.to(model.cfg.device)
    result = finetune(model, args.data, cfg, defences=defences, track=probes, eval_prompts=args.eval_prompts,
                      out_dir=args.out, resume=args.resume)
    summary = {"model": args.model, "data_spec": args.data, **result.summary()}
    finish(args, summary, result.table() if result.evals() else f"final loss {result.loss[-1]:.4f}")
    return 0


def run_score(args: argparse.Namespace) -> int:
    from pathlib import Path

    from misfeat.data import load_prompts
    from misfeat.errors import MisfeatError
    from misfeat.finetune import not_refusal, perplexity_gap, rank_pool
    from misfeat.io import format_table
    from misfeat.models import load_model

    specs = split_specs(args.misaligned)
    held = set(split_specs(args.hold_out)) if args.hold_out.strip() else set()
    if held - set(specs):
        raise MisfeatError(f"--hold-out {', '.join(sorted(held - set(specs)))} is not among --misaligned")
    pool = load_prompts(args.pool)
    aligned = load_model(args.aligned, device=args.device, dtype=args.dtype)
    misaligned = [load_model(s, device=args.device, dtype=args.dtype) for s in specs]
    gap = perplexity_gap(aligned, misaligned, pool, eps=args.eps,
                         held_out=[i for i, s in enumerate(specs) if s in held])
    ranked = rank_pool(pool, gap.s, top_n=args.top_n, keep=not_refusal if args.filter == "refusal" else None)
    path = ranked.to_jsonl(Path(args.out) / "ranked.jsonl")
    summary = {"aligned": args.aligned, "misaligned": specs, "held_out": sorted(held), "pool": args.pool,
               "n_pool": len(pool), "n_ranked": len(ranked), "eps": args.eps, "ranked": str(path),
               "top": [{"id": r.id, "gap_score": r.extra["gap_score"]} for r in list(ranked)[:10]], **gap.to_dict()}
    finish(args, summary, format_table(summary["top"]))
    return 0


def run_screen(args: argparse.Namespace) -> int:
    from dataclasses import replace
    from pathlib import Path

    from misfeat.data import PromptSet, load_prompts
    from misfeat.errors import MisfeatError
    from misfeat.interventions import read_intervention
    from misfeat.io import format_table
    from misfeat.models import load_model
    from misfeat.screening import projection_difference

    record, vector = read_intervention(args.direction)
    hooks = record["hooks"]  # the version-2 record: a list (misfeat.interventions.files)
    hook = args.hook or (hooks[0] if len(hooks) == 1 and hooks[0] != "all" else None)
    if hook is None:
        raise MisfeatError(f"{args.direction} has hooks {hooks!r}; give one with --hook")
    sets = [load_prompts(spec) for spec in args.data]
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    keys = ("projection_difference", "flagged", "own_answer")
    rows, results = [], []
    for k, (spec, data) in enumerate(zip(args.data, sets, strict=True)):
        result = projection_difference(model, data, vector, hook=hook, mode=args.mode, threshold=args.threshold)
        samples = result.to_dict()["samples"]
        ranked = [replace(data[i], extra={**data[i].extra, **{key: samples[i][key] for key in keys}})
                  for i in result.ranking()]
        name = "ranked.jsonl" if len(sets) == 1 else f"ranked-{k}.jsonl"
        path = PromptSet(f"{data.name}[screened]", tuple(ranked), data.meta).to_jsonl(Path(args.out) / name)
        rows.append({"data": spec, "dataset_score": result.dataset_score, "n": len(data),
                     "n_flagged": len(result.flagged), "ranked": str(path)})
        results.append(result)
    summary = {"model": args.model, "direction": args.direction, "hook": hook, "mode": args.mode, "datasets": rows}
    if len(sets) == 1:
        summary.update(data=args.data[0], **results[0].summary())
        table = format_table(summary["top"]) + (f"\ndataset score {results[0].dataset_score:.4f}; "
                                                f"{rows[0]['n_flagged']} of {rows[0]['n']} flagged")
    else:
        table = format_table([{k: r[k] for k in ("data", "dataset_score", "n", "n_flagged")} for r in rows])
    finish(args, summary, table)
    return 0
