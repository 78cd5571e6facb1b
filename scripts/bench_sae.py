"""Benchmark SAE training: sae-lens's SAETrainer against misfeat on the same cache, in one run.

    python scripts/bench_sae.py                      # ~3 min on a 2-core CPU
    python scripts/bench_sae.py --tokens 2000000 --write-docs

What it does:

1. caches ``blocks.1.hook_resid_post`` of the organism's chat model on pre-training-style
   documents (``organism:docs:N``; reused on later runs), plus a held-out cache of other
   documents (``organism:docs:M@seed=1``) for evaluation;
2. reads the training batches once into memory, so both trainers see the same batches in
   the same order and neither timing includes disk reads;
3. times a matrix multiply of the encoder's shape to measure this machine's GEMM FLOP/s;
4. trains the same TopK SAE (d_sae, k, AuxK, batch, steps, learning-rate schedule, inputs
   scaled to mean squared norm d_in) with sae-lens (``TopKTrainingSAE`` + ``SAETrainer``,
   wandb off) and with misfeat, alternating ``--repeats`` times; reports the best tokens/s
   of each (other engineers share the machine, so the best run is the least disturbed);
5. evaluates both SAEs with the same code on the same held-out rows (explained variance
   against the mean, L0, dead latents) and on the model's loss with the SAE spliced in;
6. prints a table; ``--write-docs`` replaces the "SAE training (issue 5)" section of
   docs/benchmarks.md with it.

The encoder-matmul limit: training needs the encoder GEMM forward (2 d_in d_sae FLOPs per
token) and, in a dense implementation, twice that backward, so tokens/s cannot exceed
GEMM_FLOP/s / (6 d_in d_sae) for a dense trainer; misfeat's sparse backward skips most of
the backward, so its fraction of that limit can approach or pass 1.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import logging
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

HOOK = "blocks.1.hook_resid_post"
SECTION = "## SAE training (issue 5)"
NOTES_MARKER = "<!-- bench_sae.py keeps everything below this line when it rewrites the section -->"
logger = logging.getLogger("bench_sae")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="organism:chat", help="model whose activations are cached")
    p.add_argument("--tokens", type=int, default=1_000_000, help="training tokens per trainer")
    p.add_argument("--docs", type=int, default=14_000, help="training documents cached (~81 tokens each)")
    p.add_argument("--eval-docs", type=int, default=3_000, help="held-out documents for evaluation")
    p.add_argument("--eval-tokens", type=int, default=131_072, help="held-out rows for EV, L0 and dead latents")
    p.add_argument("--ce-tokens", type=int, default=32_768, help="predicted tokens for the CE metrics")
    p.add_argument("--d-sae", type=int, default=1024)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--lr", type=float, default=None, help="both trainers (default: misfeat's default for d_sae)")
    p.add_argument("--repeats", type=int, default=1, help="alternating runs of each trainer; the best counts")
    p.add_argument("--cache-dir", default=None, help="where the caches live (default: $MISFEAT_HOME/bench)")
    p.add_argument("--skip-sae-lens", action="store_true", help="time misfeat only")
    p.add_argument("--write-docs", action="store_true", help="replace the section in docs/benchmarks.md")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON here")
    return p.parse_args(argv)


def machine() -> dict:
    import torch

    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}


def load_average() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "n/a"


def gemm_flops(batch: int, d_in: int, d_sae: int, seconds: float = 2.0) -> dict:
    """FLOP/s of ``[batch, d_in] @ [d_in, d_sae]`` (the encoder's forward), best and median of repeats."""
    import torch

    x, w = torch.randn(batch, d_in), torch.randn(d_in, d_sae)
    for _ in range(3):
        x @ w
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 5:
        t = time.perf_counter()
        x @ w
        times.append(time.perf_counter() - t)
    flops = 2 * batch * d_in * d_sae
    times.sort()
    return {"best": flops / times[0], "median": flops / times[len(times) // 2], "repeats": len(times)}


def build_caches(args, model, root: Path):
    from misfeat.activations import cache_activations, open_store

    stores = {}
    for name, spec in (("train", f"organism:docs:{args.docs}"), ("eval", f"organism:docs:{args.eval_docs}@seed=1")):
        path = root / f"{args.model.replace(':', '_')}-{spec.replace(':', '_').replace('@', '_')}"
        t = time.perf_counter()
        cache_activations(model, spec, [HOOK], path)
        stores[name] = open_store(path)
        logger.info("%s cache %s: %d rows (%.0f s)", name, path, stores[name].n_rows, time.perf_counter() - t)
    return stores


def train_sae_lens(batches, args, cfg):
    """sae-lens's own trainer on the same batches: TopK + AuxK, same schedule and scaling."""
    import torch
    from sae_lens import SAE, LoggingConfig, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(cfg.seed)
    d_in = batches[0].shape[1]
    n_init = max(1, math.ceil(cfg.init_tokens / cfg.batch_size))
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=cfg.d_sae, k=int(cfg.k_value),
                                                normalize_activations="expected_average_only_in",
                                                metadata=SAEMetadata(hook_name=HOOK)))
    trainer_cfg = SAETrainerConfig(
        total_training_samples=cfg.n_steps * cfg.batch_size, train_batch_size_samples=cfg.batch_size,
        lr=cfg.lr_value, lr_end=cfg.lr_value, lr_warm_up_steps=cfg.warmup_steps,
        lr_decay_steps=int(round(cfg.lr_decay_fraction * cfg.n_steps)),
        dead_feature_window=max(1, cfg.dead_tokens_value // cfg.batch_size),
        n_batches_for_norm_estimate=n_init, device="cpu", logger=LoggingConfig(log_to_wandb=False))
    # the scale is estimated from the first batches, which are then trained on, as misfeat does
    provider = itertools.chain(batches[:n_init], batches)
    start = time.perf_counter()
    SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=provider).fit()
    seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        sae.save_inference_model(tmp)
        inference = SAE.load_from_disk(tmp)
    return inference, seconds


def train_misfeat(batches, cfg):
    from misfeat.sae import train_sae

    start = time.perf_counter()
    sae = train_sae(iter(batches), cfg, show_progress=False)
    return sae, time.perf_counter() - start


def evaluate(sae, eval_store, model, args) -> dict:
    from misfeat.sae import evaluate_sae

    m = evaluate_sae(sae, eval_store, model, n_tokens=args.eval_tokens, ce_tokens=args.ce_tokens)
    return {"explained_variance": m.explained_variance, "mse": m.mse, "l0": m.l0, "dead_fraction": m.dead_fraction,
            "eval_tokens": m.n_tokens, "ce_clean": m.ce.ce_clean, "ce_sae": m.ce.ce_sae, "ce_zero": m.ce.ce_zero,
            "ce_recovered": m.ce.ce_recovered, "ce_increase": m.ce.ce_increase, "kl": m.ce.kl_sae,
            "ce_predictions": m.ce.n_predictions}


def run(args) -> dict:

    from misfeat.models import load_model
    from misfeat.organism import organism_home
    from misfeat.sae import SAETrainConfig

    load_before = load_average()
    model = load_model(args.model, device="cpu")
    root = Path(args.cache_dir) if args.cache_dir else organism_home().parent / "bench"
    stores = build_caches(args, model, root)
    cfg = SAETrainConfig(hook_name=HOOK, d_sae=args.d_sae, k=args.k, total_tokens=args.tokens,
                         batch_size=args.batch_size, lr=args.lr, device="cpu")
    store = stores["train"]
    epochs = math.ceil(args.tokens / store.n_rows) + 1
    batches = list(itertools.islice(store.batches(HOOK, args.batch_size, seed=0, epochs=epochs, drop_last=True),
                                    cfg.n_steps))
    if len(batches) < cfg.n_steps:
        raise SystemExit(f"the cache yields {len(batches)} batches, fewer than the {cfg.n_steps} steps asked for")
    d_in = batches[0].shape[1]
    gemm = gemm_flops(args.batch_size, d_in, args.d_sae)
    runs = {"sae-lens": [], "misfeat": []}
    saes = {}
    for _ in range(args.repeats):
        if not args.skip_sae_lens:
            sae, seconds = train_sae_lens(batches, args, cfg)
            runs["sae-lens"].append(cfg.n_steps * cfg.batch_size / seconds)
            saes["sae-lens"] = sae
            logger.info("sae-lens: %.0f tokens/s", runs["sae-lens"][-1])
        sae, seconds = train_misfeat(batches, cfg)
        runs["misfeat"].append(cfg.n_steps * cfg.batch_size / seconds)
        saes["misfeat"] = sae
        logger.info("misfeat: %.0f tokens/s", runs["misfeat"][-1])
    limit = gemm["best"] / (6 * d_in * args.d_sae)
    results = {name: {"tokens_per_s": max(r), "all_runs": r, **evaluate(saes[name], stores["eval"], model, args)}
               for name, r in runs.items() if r}
    results["misfeat"]["fraction_of_encoder_limit"] = results["misfeat"]["tokens_per_s"] / limit
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="minutes"),
        "command": "python " + " ".join([sys.argv[0].replace(str(Path.cwd()) + "/", ""), *sys.argv[1:]]),
        "machine": machine(), "load_before": load_before, "load_after": load_average(),
        "setup": {"model": args.model, "hook": HOOK, "d_in": d_in, "d_sae": args.d_sae, "k": args.k,
                  "batch_size": args.batch_size, "steps": cfg.n_steps, "tokens": cfg.n_steps * args.batch_size,
                  "lr": cfg.lr_value, "warmup_steps": cfg.warmup_steps, "train_rows": store.n_rows,
                  "eval_rows": stores["eval"].n_rows, "train_docs": args.docs, "eval_docs": args.eval_docs},
        "gemm_flops": gemm, "encoder_limit_tokens_per_s": limit,
        "speedup": (results["misfeat"]["tokens_per_s"] / results["sae-lens"]["tokens_per_s"]
                    if "sae-lens" in results else None),
        "results": results,
    }


def markdown(r: dict) -> str:
    s, m = r["setup"], r["machine"]
    rows = [("trainer", "tokens/s", "EV (held-out)", "L0", "dead", "CE clean", "CE with SAE", "CE zero-abl.",
             "CE recovered", "CE increase", "KL")]
    for name, v in r["results"].items():
        rows.append((name, f"{v['tokens_per_s']:,.0f}", f"{v['explained_variance']:.4f}", f"{v['l0']:.1f}",
                     f"{v['dead_fraction']:.1%}", f"{v['ce_clean']:.4f}", f"{v['ce_sae']:.4f}", f"{v['ce_zero']:.4f}",
                     f"{v['ce_recovered']:.4f}", f"{v['ce_increase']:+.4f}", f"{v['kl']:.4f}"))
    table = "\n".join("| " + " | ".join(row) + " |" for row in [rows[0], tuple("---" for _ in rows[0]), *rows[1:]])
    mis = r["results"]["misfeat"]
    speed = f"{r['speedup']:.2f}x" if r["speedup"] else "n/a (sae-lens skipped)"
    ev_gap = (f"{mis['explained_variance'] - r['results']['sae-lens']['explained_variance']:+.4f}"
              if "sae-lens" in r["results"] else "n/a")
    runs = "; ".join(f"{k}: {', '.join(f'{t:,.0f}' for t in v['all_runs'])}" for k, v in r["results"].items())
    bar = (mis["explained_variance"] >= 0.9, mis["dead_fraction"] <= 0.05, mis["ce_recovered"] >= 0.9)
    return f"""{SECTION}

Measured by `scripts/bench_sae.py` on {r['date']}: `{r['command']}`.

- Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), no GPU.
  Other engineers share it; load (`uptime`) before: `{r['load_before']}`; after: `{r['load_after']}`.
- Setup: {s['model']}, `{s['hook']}` (d_in {s['d_in']}), TopK d_sae {s['d_sae']}, k {s['k']}, AuxK, batch
  {s['batch_size']}, {s['steps']} steps = {s['tokens']:,} tokens, lr {s['lr']:.3g} for both (warm-up
  {s['warmup_steps']} steps, linear decay to 0 over the last 20%), inputs scaled to mean squared norm d_in.
  Training cache: organism:docs:{s['train_docs']} ({s['train_rows']:,} rows, read once into memory; both
  trainers get the same batches in the same order). Evaluation: held-out organism:docs:{s['eval_docs']}@seed=1
  ({mis['eval_tokens']:,} rows for EV / L0 / dead; the loss on {mis['ce_predictions']:,} predicted tokens of those
  documents, with the SAE spliced in at every position).
- Runs (tokens/s, best counts): {runs}.

{table}

- **Speed: misfeat / sae-lens = {speed}** (target >= 1.5x); EV difference misfeat - sae-lens {ev_gap}
  (target within 0.01).
- GEMM `[{s['batch_size']} x {s['d_in']}] @ [{s['d_in']} x {s['d_sae']}]`: {r['gemm_flops']['best'] / 1e9:.1f} GFLOP/s
  best, {r['gemm_flops']['median'] / 1e9:.1f} median. Encoder-matmul limit (6 d_in d_sae FLOPs per token:
  forward plus a dense backward) {r['encoder_limit_tokens_per_s']:,.0f} tokens/s; misfeat reaches
  **{mis['fraction_of_encoder_limit']:.2f}** of it.
- **Bar** (organism chat model, middle-layer residual, d_sae = 8 x d_model, k = 16), misfeat's SAE: EV
  {mis['explained_variance']:.4f} (>= 0.9: {'met' if bar[0] else 'MISSED'}), dead {mis['dead_fraction']:.2%} over
  {mis['eval_tokens']:,} tokens (<= 5%: {'met' if bar[1] else 'MISSED'}), CE recovered {mis['ce_recovered']:.4f}
  (>= 0.9: {'met' if bar[2] else 'MISSED'}), absolute CE increase {mis['ce_increase']:+.4f} nats
  ({mis['ce_clean']:.4f} -> {mis['ce_sae']:.4f}), L0 {mis['l0']:.1f}, KL {mis['kl']:.4f} nats.
"""


def write_docs(text: str, path: Path) -> None:
    """Replace (or append) this benchmark's section of docs/benchmarks.md; other sections, and
    the hand-written notes after :data:`NOTES_MARKER` in this one, are kept."""
    doc = path.read_text() if path.exists() else "# Benchmarks\n"
    start = doc.find(SECTION)
    notes = NOTES_MARKER + "\n"
    if start < 0:
        head, tail = doc.rstrip("\n") + "\n\n", ""
    else:
        end = doc.find("\n## ", start + len(SECTION))
        old = doc[start:end + 1] if end >= 0 else doc[start:]
        if NOTES_MARKER in old:
            notes = old[old.index(NOTES_MARKER):].rstrip("\n") + "\n"
        head, tail = doc[:start], (doc[end + 1:] if end >= 0 else "")
    doc = head + text.rstrip("\n") + "\n\n" + notes + ("\n" + tail if tail else "")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc)


def main(argv=None) -> int:
    import warnings

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    results = run(args)
    text = markdown(results)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if args.write_docs:
        write_docs(text, Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
