"""``misfeat cache``: cache activations of one or more checkpoints on a prompt set."""

from __future__ import annotations

import argparse

from misfeat.activations.store import STORE_DTYPES, CacheConfig
from misfeat.cli import add_device_args, add_model_args, add_output_args, finish
from misfeat.cli.fields import add_config_args, config_from_args
from misfeat.encoding import CHAT_FORMATS, POSITIONS
from misfeat.specs import split_specs


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cache", help="cache activations at chosen hooks and positions into a resumable store",
        description="Run each model over a prompt set and store the activations of the given hooks at "
        "the selected token positions (never padding) as checksummed safetensors shards plus "
        "manifest.json. One model: the store is --out itself. Several (--model a,b,c, e.g. checkpoints "
        "of one run): one store per model in --out/<index>-<name>/, row-aligned (row i is the same "
        "token in every store), listed in --out/summary.json. An interrupted run resumes where it "
        "stopped when re-run with the same arguments. Under `torchrun --nproc_per_node N -m misfeat "
        "cache ...` each rank caches a disjoint part of the prompts into the same store.",
    )
    add_model_args(p, help="model spec, or several separated by commas (row-aligned stores); a spec keeps "
                   "its options: organism:chat@seed=7,em_domain=law,organism:em@seed=7 is two models")
    p.add_argument("--prompts", required=True, metavar="SPEC", help="a JSONL prompt file or organism:<set>")
    p.add_argument("--hooks", required=True, metavar="H[,H...]",
                   help="TransformerLens hook names, e.g. blocks.1.hook_resid_post,blocks.1.hook_mlp_out")
    add_config_args(p, CacheConfig, skip=("dtype", "overwrite"), choices={"positions": POSITIONS, "chat_format": CHAT_FORMATS})
    p.add_argument("--store-dtype", choices=STORE_DTYPES, default=None,
                   help="dtype of the stored rows (default: --dtype, else float32)")
    add_device_args(p)
    add_output_args(p, out_required=True, rerun_resumes=True,
                    overwrite_help="replace an existing store instead of resuming it")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from misfeat.activations import cache_models
    from misfeat.activations.cache import multi_summary
    from misfeat.distributed import env, rank_device
    from misfeat.io import format_table
    from misfeat.models import dtype_name, resolve_dtype

    store_dtype = args.store_dtype or (dtype_name(resolve_dtype(args.dtype)) if args.dtype else "float32")
    config = config_from_args(CacheConfig, args, dtype=store_dtype, overwrite=args.overwrite)  # --overwrite: the
    # shared --out policy's option (add_output_args)
    device = rank_device(args.device)  # one GPU per rank under torchrun
    specs, hooks = split_specs(args.model), split_specs(args.hooks)
    results = cache_models(specs, args.prompts, hooks, args.out, config, device=device,
                           model_dtype=args.dtype)
    if env().rank != 0:
        return 0
    from pathlib import Path

    aligned = multi_summary(results, Path(args.out))
    summary = {"prompts": args.prompts, "hooks": hooks, "positions": args.positions,
               "dtype": store_dtype, "row_aligned": aligned["row_aligned"],
               "stores": [{**a, **r.summary(), "path": a["path"]} for a, r in zip(aligned["stores"], results,
                                                                                   strict=True)]}
    table = format_table([{"model": r.model, "rows": r.n_rows, "shards": r.n_shards, "written": r.shards_written,
                           "reused": r.shards_reused, "tokens/s": round(r.tokens_per_s)} for r in results])
    finish(args, summary, table)
    return 0
