"""``misfeat train-sae`` and ``misfeat eval-sae``: SAEs on cached or live activations."""

from __future__ import annotations

import argparse

from misfeat.cli import add_device_args, add_output_args, finish
from misfeat.cli.fields import add_config_args, config_from_args


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train-sae", help="train sparse autoencoders on cached (or live) activations",
        description="Train SAEs (TopK with the AuxK dead-latent loss by default) on the activations of one hook, "
        "read from a cache made by `misfeat cache` or produced on the fly by a model. Comma-separated "
        "--d-sae / --k / --lr values train every combination from one read of the data. Writes each SAE in "
        "the SAELens layout (DIR/cfg.json + DIR/sae_weights.safetensors, or DIR/<name>/ per SAE of a sweep), "
        "loadable with sae_lens.SAE.load_from_disk, plus DIR/summary.json and DIR/checkpoints/. Under "
        "`torchrun --nproc_per_node N -m misfeat train-sae ...` the processes train data-parallel, each on "
        "its own rows.")
    src = p.add_argument_group("data (one of --cache or --model with --prompts)")
    src.add_argument("--cache", metavar="DIR[,DIR...]", help="activation store written by `misfeat cache`; several "
                     "(e.g. the base and the fine-tuned model's activations on the same text, for model diffing) fill "
                     "every batch in equal shares")
    src.add_argument("--model", metavar="SPEC", help="produce activations on the fly with this model (no disk): "
                     "a checkpoint dir, a local Hugging Face dir or organism:<stage>; needs --prompts")
    src.add_argument("--prompts", metavar="SPEC", help="prompt set for --model: JSONL file or organism:<set> "
                     "(e.g. organism:docs:20000); passes repeat until --tokens are reached")
    src.add_argument("--positions", default="all", choices=["all", "prompt", "response", "last"],
                     help="token positions to train on with --model (default: all)")
    p.add_argument("--hook", metavar="H", help="hook name, e.g. blocks.1.hook_resid_post (default: the cache's "
                   "only hook)")
    from misfeat.sae.config import ARCHITECTURES, KERNELS, SAETrainConfig

    add_config_args(p, SAETrainConfig, only=("architecture", "total_tokens", "batch_size", "lr_warmup_steps",
                                             "aux_coefficient", "dead_tokens", "sparsity_coefficient", "kernel",
                                             "checkpoint_every", "seed"),
                    flags={"architecture": "--arch", "total_tokens": "--tokens", "lr_warmup_steps": "--warmup-steps"},
                    choices={"architecture": ARCHITECTURES, "kernel": KERNELS},
                    help_extra={"seed": " It also seeds the data order.", "total_tokens": " A cache is read for as many "
                                "epochs as this needs."})
    p.add_argument("--d-sae", type=_ints, metavar="N[,N...]",
                   help="number of latents, e.g. 8 x d_model; several values train several SAEs (required unless "
                   "--init)")
    p.add_argument("--init", metavar="DIR", help="fine-tune this SAE (SAELens format; topk, relu/standard or jumprelu) "
                   "instead of starting from a random dictionary: its width, k and architecture are kept (leave out "
                   "--d-sae, --k, --arch). Stage-wise model diffing (Bricken et al. 2024): fine-tune an SAE of the "
                   "base model on the fine-tuned model's activations; latents keep their indices")
    p.add_argument("--k", type=_floats, default=None, metavar="K[,K...]",
                   help="active latents per token (topk, batchtopk) or target L0 (jumprelu); default 32; not "
                   "used by relu; several values train several SAEs")
    p.add_argument("--lr", type=_floats, default=None, metavar="LR[,LR...]",
                   help="Adam learning rate (default 2e-3 / sqrt(d_sae / 16384)); several values train several SAEs")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in --out (same data and settings)")
    p.add_argument("--wandb", metavar="PROJECT", help="also log the live L0 / EV / dead fraction / loss to this "
                   "Weights & Biases project (off unless given; honours WANDB_MODE)")
    add_device_args(p)
    add_output_args(p, out_required=True)
    p.set_defaults(func=run)

    e = sub.add_parser(
        "eval-sae", help="measure an SAE: explained variance, L0, dead latents, CE loss recovered",
        description="Evaluate a saved SAE on the activation rows of a cache (in order): MSE, explained variance "
        "(against the mean row), L0 and the share of latents dead over --tokens rows; with --model also the "
        "next-token loss on the cache's prompts clean, with the SAE spliced in, and with the hook zeroed, the "
        "share of the loss recovered and the KL to the clean model. Writes metrics.json to --out (default: "
        "the SAE directory).")
    e.add_argument("--sae", required=True, metavar="DIR", help="SAE directory (cfg.json + sae_weights.safetensors)")
    e.add_argument("--cache", required=True, metavar="DIR", help="activation store holding the SAE's hook")
    e.add_argument("--model", metavar="SPEC", help="also measure the model's loss with the SAE spliced in")
    e.add_argument("--prompts", metavar="SPEC", help="prompts for the loss (default: those the cache was made from)")
    e.add_argument("--tokens", type=int, default=262_144, help="rows for the reconstruction metrics")
    e.add_argument("--ce-tokens", type=int, default=32_768, help="predicted tokens for the loss metrics")
    e.add_argument("--force", action="store_true", help="use an SAE trained on another model's architecture "
                   "(a warning instead of the error)")
    add_device_args(e)
    add_output_args(e)
    e.set_defaults(func=run_eval)


def _configs(args: argparse.Namespace, hook: str, device: str | None, init=None):
    import itertools

    from misfeat.errors import MisfeatError
    from misfeat.sae import SAETrainConfig

    ks = args.k if args.k is not None else [None]
    lrs = args.lr if args.lr is not None else [None]
    if init is not None:
        from misfeat.sae.adapt import fine_tune_config
        from misfeat.sae.latents import hook_of

        if args.d_sae or args.k:
            raise MisfeatError("--init keeps the SAE's width and k; leave out --d-sae and --k")
        if hook_of(init) != hook:
            raise MisfeatError(f"--init's SAE reads {hook_of(init)}, the data is {hook}; give data of the SAE's hook")
        keep = ("lr_warmup_steps", "dead_tokens", "kernel", "checkpoint_every")
        return [fine_tune_config(init, args.total_tokens, batch_size=args.batch_size, lr=lr, seed=args.seed,
                                 device=device, **{f: getattr(args, f) for f in keep}) for lr in lrs]
    if not args.d_sae:
        raise MisfeatError("give --d-sae N (the number of latents), or --init DIR to fine-tune an SAE")
    cfgs = []
    for d_sae, k, lr in itertools.product(args.d_sae, ks, lrs):
        if k is not None and args.architecture == "topk":
            k = int(k) if float(k).is_integer() else k
        cfgs.append(config_from_args(SAETrainConfig, args, hook_name=hook, d_sae=d_sae, k=k, lr=lr, device=device))
    return cfgs


def _stream(args: argparse.Namespace, world, device: str | None):
    """(hook, batches, data description) for --cache or --model/--prompts."""
    from misfeat.errors import MisfeatError
    from misfeat.sae.sources import caches_source, live_source

    if bool(args.cache) == bool(args.model):
        raise MisfeatError("give exactly one data source: --cache DIR, or --model SPEC with --prompts SPEC")
    if args.cache:
        caches = [c for c in args.cache.split(",") if c]
        source = caches_source(caches, args.hook, batch_size=args.batch_size, tokens=args.total_tokens,
                               seed=args.seed, world=world)
        return source.hook, source.batches, {**source.info, "model_name": source.model_name, **source.origin}
    if not args.prompts or not args.hook:
        raise MisfeatError("--model needs --prompts SPEC (the text to run) and --hook H (where to read)")
    from misfeat.models import load_model

    model = load_model(args.model, device=device, dtype=args.dtype)
    source = live_source(model, args.prompts, args.hook, batch_size=args.batch_size, tokens=args.total_tokens,
                         positions=args.positions, seed=args.seed, world=world)
    return source.hook, source.batches, {"model": args.model, "prompts": args.prompts, "positions": args.positions,
                                         "model_name": source.model_name, **source.origin}


def _wandb_logger(args: argparse.Namespace, cfgs, data: dict):
    """A train_saes ``on_log`` callback that sends the live statistics to wandb."""
    import wandb

    wandb.init(project=args.wandb, config={"data": data, "saes": [c.to_dict() for c in cfgs]})

    def log(step: int, stats: list[dict[str, float]]) -> None:
        wandb.log({f"{cfg.describe()}/{key}": value for cfg, row in zip(cfgs, stats, strict=True)
                   for key, value in row.items()}, step=step)

    return log


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from misfeat.distributed import join, shutdown
    from misfeat.io import format_table
    from misfeat.sae.io import RunPaths
    from misfeat.sae.train import train_saes

    world, device = join(args.device)
    if args.overwrite and world.is_main:  # a fresh run: stale checkpoints must not be resumed later
        import shutil

        shutil.rmtree(RunPaths(Path(args.out)).checkpoints, ignore_errors=True)
    hook, batches, data = _stream(args, world, device)
    init = None
    if args.init:
        from misfeat.sae.io import load_sae

        init = load_sae(args.init, device=device)
    cfgs = _configs(args, hook, device, init)
    meta = {"model_name": data.pop("model_name", None) or data.get("model") or data.get("cache"),
            **{key: data[key] for key in ("model_fingerprint", "model_architecture") if data.get(key)}}
    # On an error this process exits without leaving the group (which would wait for the
    # others); torchrun then stops the rest.
    on_log = _wandb_logger(args, cfgs, data) if args.wandb and world.is_main else None
    if init is not None:
        meta["adapted_from"] = args.init
    saes = train_saes(batches, cfgs, out_dir=args.out, resume=args.resume, metadata=meta, on_log=on_log, init=init)
    shutdown()
    if not world.is_main:
        return 0
    paths = RunPaths(Path(args.out))
    rows = []
    for index, (cfg, sae) in enumerate(zip(cfgs, saes, strict=True)):
        info = sae.cfg.metadata.misfeat_training
        last = info.get("last_batch") or {}
        rows.append({"dir": str(paths.sae_dir(cfgs, index)), "architecture": cfg.architecture, "d_sae": cfg.d_sae,
                     "k": cfg.k_value if cfg.architecture != "relu" else None, "lr": cfg.lr_value,
                     "steps": info["steps"], "tokens": info["tokens"], "tokens_per_s": info["tokens_per_s"],
                     "last_batch_l0": last.get("L0"), "last_batch_ev": last.get("EV"),
                     "dead_fraction_live": last.get("dead")})
    summary = {"hook": hook, "data": data, "world_size": world.size, "saes": rows}
    table = format_table(rows, ["dir", "architecture", "d_sae", "k", "steps", "tokens_per_s", "last_batch_l0",
                                "last_batch_ev", "dead_fraction_live"])
    finish(args, summary, table)
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from misfeat.activations import open_store
    from misfeat.models import load_model
    from misfeat.sae.io import load_sae
    from misfeat.sae.metrics import evaluate_sae
    from misfeat.validate import check_out_dir, check_sae_model, check_sae_store

    check_out_dir(args.out or args.sae, "--out" if args.out else "the SAE directory (metrics.json goes there)")
    sae = load_sae(args.sae, device=args.device)
    store = open_store(args.cache)
    check_sae_store(sae, store, force=args.force)
    model = load_model(args.model, device=args.device, dtype=args.dtype) if args.model else None
    if model is not None:
        check_sae_model(sae, model, force=args.force, where=args.model)
    metrics = evaluate_sae(sae, store, model, n_tokens=args.tokens, ce_tokens=args.ce_tokens,
                           out_dir=args.out or args.sae, prompts=args.prompts)
    from misfeat.validate import sae_origin

    summary = {"sae": args.sae, "cache": args.cache, "model": args.model, **metrics.to_dict(),
               "sae_model": sae_origin(sae).get("model_fingerprint"),
               "cache_model": store.manifest.get("model", {}).get("fingerprint")}
    finish(args, summary, metrics.table())
    return 0
