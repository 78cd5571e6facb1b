"""Cache one prompt set for every checkpoint of a directory and tabulate how the activations move.

Where it sits: activations (one row-aligned store per checkpoint) -> a per-checkpoint table,
the raw material of a checkpoint trajectory (e.g. the organism's EM fine-tune, saved every
2 steps under ``em-steps/``)::

    python scripts/extract_across_checkpoints.py --checkpoints organism:em-steps \\
        --prompts organism:heldout --hook blocks.1.hook_resid_post --positions last \\
        --direction persona.safetensors --out runs/em-trajectory

``--checkpoints``: a directory whose subdirectories are model checkpoints (misfeat or
Hugging Face), ``organism:em-steps`` for the organism's, or a comma-separated list.
Writes ``OUT/<checkpoint>/`` (a store each; re-running resumes), ``OUT/checkpoint_stats.jsonl``
and ``OUT/summary.json``, and prints the table. Statistics per checkpoint: rows, mean row
norm, mean projection on the unit ``--direction`` (a ``[d]`` vector in .safetensors, .pt or
.npy) and the cosine of the mean row with it, and how far the mean row moved from the
first checkpoint's.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger("extract_across_checkpoints")


def find_checkpoints(spec: str) -> list[Path]:
    from misfeat.errors import MisfeatError
    from misfeat.models import CHECKPOINT_FILE

    if spec == "organism:em-steps" or spec.startswith("organism:em-steps@"):
        from misfeat.organism import ensure_organism, parse_options

        spec = str(ensure_organism(parse_options(spec.partition("@")[2])) / "em-steps")
    if "," in spec:
        paths = [Path(p.strip()).expanduser() for p in spec.split(",") if p.strip()]
    else:
        root = Path(spec).expanduser()
        if not root.is_dir():
            raise MisfeatError(f"checkpoint directory {root} does not exist")
        paths = sorted(p for p in root.iterdir() if p.is_dir())
    paths = [p for p in paths if (p / CHECKPOINT_FILE).is_file() or (p / "config.json").is_file()]
    if not paths:
        raise MisfeatError(f"no model checkpoints (directories with {CHECKPOINT_FILE} or config.json) in {spec}")
    return paths


def load_direction(path: str | None, d: int):
    """The unit ``[d]`` direction stored in ``path`` (one tensor), or None."""
    import numpy as np
    import torch

    from misfeat.errors import MisfeatError

    if path is None:
        return None
    p = Path(path)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = list(load_file(str(p)).values())
    elif p.suffix == ".npy":
        tensors = [torch.from_numpy(np.load(p))]
    else:
        obj = torch.load(p, map_location="cpu", weights_only=True)
        tensors = list(obj.values()) if isinstance(obj, dict) else [obj]
    if len(tensors) != 1 or tuple(tensors[0].shape) != (d,):
        raise MisfeatError(f"{p} must hold one vector of shape [{d}] (found {[tuple(t.shape) for t in tensors]})")
    v = tensors[0].double()
    return v / v.norm()


def store_stats(store, hook: str, direction) -> tuple[dict[str, Any], Any]:
    """Streamed statistics of one store (memory: one batch), and its mean row."""
    import torch

    n, norm_sum, proj_sum = 0, 0.0, 0.0
    total = torch.zeros(store.d_of(hook), dtype=torch.float64)
    for batch in store.batches(hook, 4096, shuffle=False, dtype=torch.float64):
        n += len(batch)
        norm_sum += float(batch.norm(dim=1).sum())
        total += batch.sum(0)
        if direction is not None:
            proj_sum += float((batch @ direction).sum())
    mean = total / max(n, 1)
    stats: dict[str, Any] = {"rows": n, "mean_norm": norm_sum / max(n, 1), "norm_of_mean": float(mean.norm())}
    if direction is not None:
        stats["mean_projection"] = proj_sum / max(n, 1)
        stats["cosine_mean_direction"] = float(mean @ direction / mean.norm().clamp_min(1e-12))
    return stats, mean


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", required=True, help="directory of checkpoints, organism:em-steps, or a,b,c")
    parser.add_argument("--prompts", required=True, help="JSONL prompt file or organism:<set>")
    parser.add_argument("--hook", required=True, help="e.g. blocks.1.hook_resid_post")
    parser.add_argument("--positions", default="all", choices=["all", "prompt", "response", "last"])
    parser.add_argument("--direction", default=None, help="a [d] vector (.safetensors, .pt, .npy) to project on")
    parser.add_argument("--out", required=True, help="output directory (one store per checkpoint inside)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--batch-tokens", type=int, default=None)
    parser.add_argument("--overwrite", action="store_true", help="recompute stores instead of resuming them")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    from misfeat.errors import MisfeatError

    try:
        rows = run(args)
    except MisfeatError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from misfeat.io import format_table

    print(format_table(rows, floatfmt=".4f"))
    return 0


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    import warnings

    warnings.filterwarnings("ignore", category=DeprecationWarning)  # TransformerLens's constructor notice
    from misfeat.activations import CacheConfig, cache_with_config, open_store
    from misfeat.activations.cache import resolve_prompts
    from misfeat.io import SUMMARY_FILE, progress, write_json, write_jsonl
    from misfeat.models import fingerprint, load_model

    checkpoints = find_checkpoints(args.checkpoints)
    pset, prompt_spec = resolve_prompts(args.prompts)
    config = CacheConfig(positions=args.positions, batch_tokens=args.batch_tokens, overwrite=args.overwrite)
    out = Path(args.out)
    rows: list[dict[str, Any]] = []
    direction = first_mean = None
    for path in progress(checkpoints, desc="checkpoints", unit="ckpt"):
        model = load_model(str(path), device=args.device)
        result = cache_with_config(model, pset, prompt_spec, [args.hook], out / path.name, config)
        store = open_store(result.path, verify=False)
        if direction is None and args.direction is not None:
            direction = load_direction(args.direction, store.d_of(args.hook))
        stats, mean = store_stats(store, args.hook, direction)
        first_mean = mean if first_mean is None else first_mean
        rows.append({"checkpoint": path.name, "fingerprint": fingerprint(model), **stats,
                     "mean_shift_from_first": float((mean - first_mean).norm())})
        del model
    write_jsonl(out / "checkpoint_stats.jsonl", rows)
    write_json(out / SUMMARY_FILE, {"checkpoints": args.checkpoints, "prompts": args.prompts, "hook": args.hook,
                                    "positions": args.positions, "direction": args.direction, "rows": rows})
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
