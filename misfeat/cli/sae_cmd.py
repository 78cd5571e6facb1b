"""``misfeat train-sae`` and ``misfeat eval-sae``: SAEs on cached or live activations."""

from __future__ import annotations

import argparse
import math

from misfeat.cli import add_device_args, add_output_args, finish


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
    src.add_argument("--cache", metavar="DIR", help="activation store written by `misfeat cache`")
    src.add_argument("--model", metavar="SPEC", help="produce activations on the fly with this model (no disk): "
                     "a checkpoint dir, a local Hugging Face dir or organism:<stage>; needs --prompts")
    src.add_argument("--prompts", metavar="SPEC", help="prompt set for --model: JSONL file or organism:<set> "
                     "(e.g. organism:docs:20000); passes repeat until --tokens are reached")
    src.add_argument("--positions", default="all", choices=["all", "prompt", "response", "last"],
                     help="token positions to train on with --model (default: all)")
    p.add_argument("--hook", metavar="H", help="hook name, e.g. blocks.1.hook_resid_post (default: the cache's "
                   "only hook)")
    p.add_argument("--arch", default="topk", choices=["topk", "batchtopk", "relu", "jumprelu"],
                   help="topk (default; k latents per token), batchtopk (k on average, saved as JumpReLU), relu "
                   "(L1 penalty) or jumprelu (L0 penalty around k)")
    p.add_argument("--d-sae", type=_ints, required=True, metavar="N[,N...]",
                   help="number of latents, e.g. 8 x d_model; several values train several SAEs")
    p.add_argument("--k", type=_floats, default=None, metavar="K[,K...]",
                   help="active latents per token (topk, batchtopk) or target L0 (jumprelu); default 32; not "
                   "used by relu")
    p.add_argument("--tokens", type=int, default=2_000_000, metavar="T",
                   help="activation rows to train on (default 2,000,000); a cache is read for as many epochs "
                   "as this needs")
    p.add_argument("--batch-size", type=int, default=4096, help="rows per step over all processes (default 4096)")
    p.add_argument("--lr", type=_floats, default=None, metavar="LR[,LR...]",
                   help="Adam learning rate (default 2e-3 / sqrt(d_sae / 16384))")
    p.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up steps (default 5%% of steps)")
    p.add_argument("--aux-coefficient", type=float, default=None,
                   help="weight of the AuxK dead-latent loss for topk/batchtopk/jumprelu (default 1.0; 0 disables it)")
    p.add_argument("--dead-tokens", type=int, default=None,
                   help="tokens without firing after which a latent counts as dead (default min(10M, T/10))")
    p.add_argument("--sparsity-coefficient", type=float, default=None,
                   help="relu: L1 weight (default 1e-2); jumprelu: weight of the L0 penalty around k (default 3e-3)")
    p.add_argument("--kernel", default="auto", choices=["auto", "sparse", "dense"],
                   help="sparse: the TopK backward touches only the selected latents; dense: plain reference")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="STEPS",
                   help="write a resumable checkpoint to DIR/checkpoints every STEPS steps (default: never)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in --out (same data and settings)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the data order")
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
    add_device_args(e)
    add_output_args(e)
    e.set_defaults(func=run_eval)


def _configs(args: argparse.Namespace, hook: str, device: str | None):
    import itertools

    from misfeat.sae import SAETrainConfig

    ks = args.k if args.k is not None else [None]
    lrs = args.lr if args.lr is not None else [None]
    cfgs = []
    for d_sae, k, lr in itertools.product(args.d_sae, ks, lrs):
        extra = {name: value for name, value in (
            ("aux_coefficient", args.aux_coefficient), ("dead_tokens", args.dead_tokens),
            ("sparsity_coefficient", args.sparsity_coefficient), ("lr_warmup_steps", args.warmup_steps),
        ) if value is not None}
        if k is not None and args.arch == "topk":
            k = int(k) if float(k).is_integer() else k
        cfgs.append(SAETrainConfig(
            hook_name=hook, d_sae=d_sae, architecture=args.arch, k=k, total_tokens=args.tokens,
            batch_size=args.batch_size, lr=lr, kernel=args.kernel, checkpoint_every=args.checkpoint_every,
            seed=args.seed, device=device, **extra))
    return cfgs


def _stream(args: argparse.Namespace, world, device: str | None):
    """(hook, batches, data description) for --cache or --model/--prompts."""
    from misfeat.errors import MisfeatError

    if bool(args.cache) == bool(args.model):
        raise MisfeatError("give exactly one data source: --cache DIR, or --model SPEC with --prompts SPEC")
    local_batch = args.batch_size // world.size
    if args.cache:
        from misfeat.activations import open_store

        store = open_store(args.cache)
        hook = args.hook or (store.hooks[0] if len(store.hooks) == 1 else None)
        if hook is None:
            raise MisfeatError(f"the cache holds several hooks ({', '.join(store.hooks)}); choose one with --hook")
        if hook not in store.hooks:
            raise MisfeatError(f"the cache has no hook {hook}; it holds {', '.join(store.hooks)}")
        epochs = math.ceil(args.tokens / store.n_rows) + 1
        # The store deals chunks of buffer_rows / 8 rows to the processes in turn; keep the
        # chunks small enough that every process of a data-parallel run gets several.
        buffer_rows = None if world.size == 1 else max(2 * local_batch, min(1 << 18, 2 * store.n_rows // world.size))
        batches = store.batches(hook, local_batch, shuffle=True, seed=args.seed, epochs=epochs,
                                rank=world.rank, world_size=world.size, buffer_rows=buffer_rows)
        return hook, batches, {"cache": args.cache, "cache_rows": store.n_rows, "positions": store.positions,
                               "model_name": store.manifest["model"]["spec"]}  # the model, not the cache path
    if not args.prompts or not args.hook:
        raise MisfeatError("--model needs --prompts SPEC (the text to run) and --hook H (where to read)")
    from misfeat.activations import iter_activations
    from misfeat.data import PromptSet, load_prompts
    from misfeat.hooks import check_hooks
    from misfeat.models import load_model
    from misfeat.sae.batching import repeat, shuffled

    model = load_model(args.model, device=device, dtype=args.dtype)
    check_hooks(model, [args.hook])
    prompts = load_prompts(args.prompts)
    if world.size > 1:  # each process runs its own prompts
        prompts = PromptSet(f"{prompts.name}[{world.rank}::{world.size}]", prompts.records[world.rank::world.size],
                            prompts.meta)
    live = repeat(lambda: iter_activations(model, prompts, args.hook, args.positions))
    buffer_rows = min(max(64 * local_batch, 1 << 16), max(2 * local_batch, args.tokens // world.size))
    batches = shuffled(live, buffer_rows=buffer_rows, seed=args.seed + world.rank, out_rows=local_batch)
    return args.hook, batches, {"model": args.model, "prompts": args.prompts, "positions": args.positions,
                                "model_name": args.model}


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

    from misfeat.io import format_table
    from misfeat.sae.distributed import init_from_env, shutdown
    from misfeat.sae.io import RunPaths
    from misfeat.sae.train import train_saes

    world, device = init_from_env(args.device)
    hook, batches, data = _stream(args, world, device)
    cfgs = _configs(args, hook, device)
    meta = {"model_name": data.pop("model_name", None) or data.get("model") or data.get("cache")}
    # On an error this process exits without leaving the group (which would wait for the
    # others); torchrun then stops the rest.
    on_log = _wandb_logger(args, cfgs, data) if args.wandb and world.is_main else None
    saes = train_saes(batches, cfgs, out_dir=args.out, resume=args.resume, metadata=meta, on_log=on_log)
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

    sae = load_sae(args.sae, device=args.device)
    store = open_store(args.cache)
    model = load_model(args.model, device=args.device, dtype=args.dtype) if args.model else None
    metrics = evaluate_sae(sae, store, model, n_tokens=args.tokens, ce_tokens=args.ce_tokens,
                           out_dir=args.out or args.sae, prompts=args.prompts)
    summary = {"sae": args.sae, "cache": args.cache, "model": args.model, **metrics.to_dict()}
    finish(args, summary, metrics.table())
    return 0
