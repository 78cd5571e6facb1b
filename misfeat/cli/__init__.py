"""The ``misfeat`` command line: thin wrappers that parse, call the library, write a summary.

Every command module registers its own sub-parser and imports torch, transformer_lens
and sae_lens only inside its ``run`` function, so ``misfeat --help`` stays fast.
Commands that produce results share ``--out DIR`` (writes ``DIR/summary.json``) and
``--json`` (print the summary JSON instead of the table).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from typing import Any

# command modules, in the order --help lists them; each defines register(subparsers)
_COMMAND_MODULES = (
    "misfeat.cli.demo_cmd",
    "misfeat.cli.organism_cmd",
    "misfeat.cli.eval_cmd",
    "misfeat.cli.cache_cmd",
    "misfeat.cli.sae_cmd",
    "misfeat.cli.locate_cmd",
    "misfeat.cli.steer_cmd",
    "misfeat.cli.realign_cmd",
    "misfeat.cli.finetune_cmd",
    "misfeat.cli.defences_cmd",
    "misfeat.cli.dynamics_cmd",
    "misfeat.cli.restore_cmd",
    "misfeat.cli.inspect_cmd",
    "misfeat.cli.export_cmd",
)

DESCRIPTION = """\
misfeat: find, steer and remove misalignment features in language models.

The loop: build or load a model, cache its activations, train an SAE on them, locate
the feature that a narrow bad fine-tune switches on, steer or ablate it, and realign
the model with a few steps of fine-tuning. The built-in model organism
(organism:chat, organism:em, ...) shows the whole loop on a CPU in minutes.
"""


def add_output_args(parser: argparse.ArgumentParser, out_required: bool = False, rerun_resumes: bool = False,
                    overwrite_help: str | None = None) -> None:
    """``--out DIR``, ``--overwrite`` and ``--json``, shared by every command that produces results.

    The policy for an --out that already holds results (misfeat.validate): refused unless
    --overwrite or --resume; ``rerun_resumes`` commands (cache) resume a re-run instead,
    after checking that its configuration and data match."""
    parser.add_argument("--out", metavar="DIR", required=out_required,
                        help="write DIR/summary.json (and the command's other outputs) here; a DIR holding results "
                        "is refused unless --overwrite" + (" (a re-run resumes it)" if rerun_resumes else
                                                           " or --resume (where the command has it)"))
    parser.add_argument("--overwrite", action="store_true",
                        help=overwrite_help or "replace the results already in --out")
    parser.add_argument("--json", action="store_true",
                        help="print the summary as JSON on stdout instead of a table")
    parser.set_defaults(out_policy="rerun-resumes" if rerun_resumes else "refuse")


def add_model_args(parser: argparse.ArgumentParser, flag: str = "--model", required: bool = True,
                   help: str | None = None) -> None:
    parser.add_argument(flag, required=required, metavar="SPEC", help=help or (
        "model: a misfeat checkpoint dir, a local Hugging Face dir, an official TransformerLens "
        "name (needs the hub), or organism:<stage> (pretrain, chat, em, control)"))


def add_device_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--dtype", default=None, help="float32 (default) or bfloat16")


def finish(args: argparse.Namespace, summary: dict[str, Any], table: str) -> None:
    """Write ``summary.json`` under ``--out`` if given; print the table, or JSON with ``--json``."""
    from misfeat.io import SUMMARY_FILE, _clean, write_json

    if getattr(args, "out", None):
        from pathlib import Path

        path = write_json(Path(args.out) / SUMMARY_FILE, summary)
        logging.getLogger("misfeat").info("wrote %s", path)
    if getattr(args, "json", False):
        print(json.dumps(_clean(summary), indent=2))
    else:
        print(table)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="misfeat", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    from misfeat import __version__

    parser.add_argument("--version", action="version", version=f"misfeat {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="<command>", title="commands")
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose > 1 else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "filelock", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if verbose < 2:  # TransformerLens announces every HookedTransformer it builds
        import warnings

        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    _setup_logging(args.verbose, args.quiet)
    from misfeat.errors import MisfeatError

    lock = None
    try:
        lock = _check_before_work(args)
        result = args.func(args)
    except MisfeatError as err:
        print(f"misfeat {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"misfeat {args.command}: interrupted; what was written so far is kept", file=sys.stderr)
        return 130
    except Exception as err:  # a bug, or an input nothing checked: one line unless -vv
        if args.verbose > 1:
            raise
        print(f"misfeat {args.command}: error: {type(err).__name__}: {err} (unexpected; run with -vv for the "
              "traceback and report it)", file=sys.stderr)
        return 1
    finally:
        if lock is not None:
            lock.close()
    return int(result or 0)


def _check_before_work(args: argparse.Namespace):
    """The checks every command shares, before any work: --device and --dtype name real ones,
    --out is a writable directory and no other misfeat process writes it (the lock,
    returned, is held until the command ends; under torchrun process 0 holds it)."""
    import os

    from misfeat.validate import check_no_results, check_out_dir, lock_out

    if getattr(args, "device", None) or getattr(args, "dtype", None):
        from misfeat.models import resolve_device, resolve_dtype

        if args.device and args.device != "cuda":  # cuda without a GPU: each command says what to do
            resolve_device(args.device)
        resolve_dtype(args.dtype)
    out, policy = getattr(args, "out", None), getattr(args, "out_policy", None)
    if not out or policy is None:  # demo and organism keep their own --out (stages that resume, a file)
        return None
    check_out_dir(out)
    if not (policy == "rerun-resumes" or args.overwrite or getattr(args, "resume", False)):
        check_no_results(out)
    return lock_out(out) if os.environ.get("RANK", "0") == "0" else None
