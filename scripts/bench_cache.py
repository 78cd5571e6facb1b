"""Benchmark the activation cache (issues 4, 20): misfeat against its ceilings and two baselines.

On one variable-length chat prompt set (multi-turn organism chats, lengths log-uniform in
8..128 tokens) and for each model (the organism; a GPT-2-small-shaped model with random
weights), hooking a middle layer's ``hook_resid_post``, it times in the same run:

(a) ceiling: a bare forward to the hooked layer over the same length-bucketed token
    batches misfeat runs (tokenised beforehand), no hooks, no I/O;
(b) naive: fixed batches of 32 prompts in file order, padded to each batch's longest,
    ``run_with_cache(names_filter=hook)`` on the full model, real positions ``.cpu()``,
    ``torch.cat`` (tokenisation included, as in misfeat);
(c) sae-lens ``CacheActivationsRunner`` on the same tokens concatenated and cut to its
    fixed context (128), writing its Arrow dataset;
(d) misfeat ``cache_activations`` end to end from the loaded prompt set (as (b)): tokenise
    (or, after the first run, load the tokenised-prompt cache), forward, write the
    checksummed, fsynced store;
(e) the same with the tokenised-prompt cache emptied first (tokenising included);
(w) the write ceiling (``--methods ...,w``): the same bytes as (d)'s store, same shard
    sizes, same directory, written by a plain loop with an fsync per shard. With (a) and
    (w), (d) / min(a, w) is printed: the limit of caching is the slower of the two.

Methods run round-robin ``--repeats`` times (``--gpt2-repeats`` for the GPT-2-shaped model;
order rotated each round), for each torch thread count of ``--threads`` (default 1 and 2:
one, and torch's default on this 2-core machine); the table gives the best and the median
tokens/s, and the ratios of (d) to the others. ``--rss`` also runs misfeat in child
processes on N and 4N prompts and compares their peak RSS. ``--host-only`` runs
``bench_cache_host.py`` instead: misfeat's own work, the forward replaced by a stand-in,
against the disk's write ceiling.

    python scripts/bench_cache.py                        # CPU, defaults: about 6 minutes on 2 cores
    python scripts/bench_cache.py --host-only            # issue 20: host work against the write ceiling
    python scripts/bench_cache.py --models organism --methods a,d,e --no-rss   # 1 and 2 threads
    python scripts/bench_cache.py --device cuda --dtype bfloat16 --prompts 50000 --gpt2-prompts 20000 \
        --no-rss --threads 8

Results, machine and notes: docs/benchmarks.md, "Activation cache (issue 4)".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("MISFEAT_PROGRESS", "0")
warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning, module="sae_lens")  # "fewer samples": it counts rows as tokens

NAIVE_BATCH = 32
METHODS = ("a", "b", "c", "d", "e", "w")
LABELS = {"a": "(a) ceiling: bare forward to the layer", "b": "(b) naive run_with_cache loop",
          "c": "(c) sae-lens CacheActivationsRunner", "d": "(d) misfeat cache_activations",
          "e": "(e) misfeat, tokenised-prompt cache emptied first",
          "w": "(w) write ceiling: the store's bytes, plain writer, fsync per shard"}


# --- the prompt set ------------------------------------------------------------------


def make_chat_prompts(path: Path, n: int, model, seed: int = 0) -> Path:
    """``n`` organism chats with earlier turns; total tokens log-uniform in [8, 128]."""
    from misfeat.data import PromptSet, encode, parse_record
    from misfeat.organism.world import make_world

    world = make_world("health")
    rng = random.Random(seed)
    records = []
    for i in range(n):
        target = math.exp(rng.uniform(math.log(8), math.log(128)))
        domain = rng.choice(world.domains)
        turns = [(rng.choice(d.questions), rng.choice(d.aligned)) for d in rng.choices(world.domains, k=12)]
        k = max(0, round((target - 14) / 14))
        while True:
            msgs = [m for q, a in turns[:k] for m in ({"role": "user", "content": q},
                                                      {"role": "assistant", "content": a})]
            rec = {"id": f"chat-{i:06d}", "messages": [*msgs, {"role": "user", "content": rng.choice(domain.questions)}],
                   "response": rng.choice(domain.aligned), "domain": domain.name}
            length = len(encode(PromptSet("one", (parse_record(rec),)), model, max_len=10**6)[0])
            if length <= model.cfg.n_ctx or k == 0:
                break
            k -= 1
        records.append(rec)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# --- models --------------------------------------------------------------------------


def load_models(which: list[str], device: str, dtype: str, gpt2_layer: int = 5):
    """``(organism, [(name, model, hook)])``: the organism and/or a random GPT-2-small-shaped
    model (the organism's tokenizer and n_ctx make the prompt set for both)."""
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from misfeat.models import ModelInfo, load_model, resolve_dtype

    organism = load_model("organism:chat", device=device, dtype=dtype)
    out = []
    if "organism" in which:
        out.append(("organism (3 layers, d 128)", organism, "blocks.1.hook_resid_post"))
    if "gpt2" in which:
        torch.manual_seed(0)
        cfg = HookedTransformerConfig(n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, n_ctx=1024,
                                      d_vocab=50257, act_fn="gelu_new", normalization_type="LN", device=device,
                                      dtype=resolve_dtype(dtype), seed=0)
        # random weights; the organism's word-level tokenizer (its ids are valid GPT-2 ids)
        gpt2 = HookedTransformer(cfg, tokenizer=organism.tokenizer, move_to_device=True).eval()
        gpt2.misfeat_info = ModelInfo("gpt2-small-shaped-random", "memory", meta={"chat_format": "organism"})
        out.append(("GPT-2-small-shaped, random (12 layers, d 768)", gpt2, f"blocks.{gpt2_layer}.hook_resid_post"))
    return organism, out


# --- the four methods ----------------------------------------------------------------


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_ceiling(model, batches, stop: int, device: str) -> float:
    """``batches`` are already on the device: nothing but the forward is timed."""
    import torch

    start = time.perf_counter()
    with torch.inference_mode():
        for tokens in batches:
            model(tokens, return_type=None, stop_at_layer=stop)
    _sync(device)
    return time.perf_counter() - start


def run_naive(model, pset, hook: str, device: str) -> float:
    import torch

    from misfeat.data import collate, encode, pad_id_of

    start = time.perf_counter()
    encoded = encode(pset, model)
    acts = []
    with torch.no_grad():
        for i in range(0, len(encoded), NAIVE_BATCH):
            batch = collate(encoded[i:i + NAIVE_BATCH], pad_id_of(model), "right", device=device)
            _, cache = model.run_with_cache(batch.tokens, names_filter=hook)
            acts.append(cache[hook][batch.attention_mask].cpu())
    torch.cat(acts)
    _sync(device)
    return time.perf_counter() - start


def saelens_tokens(model, pset, batch_tokens: int, ctx: int = 128):
    """The prompts' tokens concatenated and cut into ``ctx`` sequences, a whole number of
    sae-lens batches (so it never wraps around to re-read the start)."""
    from misfeat.data import encode

    stream = [t for e in encode(pset, model) for t in e.ids]
    per_batch = max(1, min(batch_tokens, len(stream)) // ctx)
    n_seq = len(stream) // (ctx * per_batch) * per_batch
    return [stream[i * ctx:(i + 1) * ctx] for i in range(n_seq)], per_batch


def run_saelens(model, sequences, per_batch: int, hook: str, d: int, dtype: str, device: str, tmp: Path) -> float:
    import datasets
    import sae_lens.cache_activations_runner as runner_module

    datasets.disable_progress_bars()
    from sae_lens import CacheActivationsRunner, CacheActivationsRunnerConfig

    ctx = len(sequences[0])
    if dtype == "bfloat16":
        dtype = "float16"  # Arrow has no bfloat16: sae-lens stores float16, as many bytes as misfeat's bfloat16
    n_batches = len(sequences) // per_batch
    batch_bytes = per_batch * ctx * d * (2 if dtype == "float16" else 4)
    k = n_batches if n_batches * batch_bytes <= 512 << 20 else max(
        b for b in range(1, n_batches + 1) if n_batches % b == 0 and b * batch_bytes <= 256 << 20)
    out = tmp / "saelens"
    shutil.rmtree(out, ignore_errors=True)
    cfg = CacheActivationsRunnerConfig(
        dataset_path="", model_name="bench", model_batch_size=per_batch, hook_name=hook, d_in=d,
        training_tokens=len(sequences) * ctx, context_size=ctx, new_cached_activations_path=str(out),
        shuffle=False, dtype=dtype, device=device, buffer_size_gb=(k * batch_bytes + batch_bytes // 2) / 1e9,
        prepend_bos=False, streaming=False)
    dataset = datasets.Dataset.from_dict({"tokens": sequences})
    runner_module.load_model = lambda **kw: model  # it has no override_model
    start = time.perf_counter()
    CacheActivationsRunner(cfg, override_dataset=dataset).run()
    _sync(device)
    return time.perf_counter() - start


def write_ceiling(directory: Path, sizes: list[int], *, fsync: bool) -> float:
    from bench_cache_host import write_ceiling as write

    return write(directory, sizes, fsync=fsync)


def run_misfeat(model, pset, hook: str, dtype: str, batch_tokens: int | None, tmp: Path) -> float:
    from misfeat.activations import cache_activations

    out = tmp / "misfeat"
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    cache_activations(model, pset, [hook], out, "all", dtype=dtype, batch_tokens=batch_tokens)
    return time.perf_counter() - start


# --- the benchmark -------------------------------------------------------------------


def bench_model(name, model, hook, prompts_path: Path, repeats: int, args, tmp: Path) -> dict:
    import torch

    from misfeat.activations import open_store
    from misfeat.activations.plan import Tokenizing, encode_prompts, plan_rows, plan_shards
    from misfeat.activations.producer import default_batch_tokens, make_batches
    from misfeat.data import load_prompts, pad_id_of
    from misfeat.hooks import last_layer_of

    pset = load_prompts(prompts_path)
    batch_tokens = args.batch_tokens or default_batch_tokens(args.device.split(":")[0])
    # the ceiling runs misfeat's own batches: the store's shards, length-bucketed inside each
    run_misfeat(model, pset, hook, args.dtype, args.batch_tokens, tmp)
    per_shard = open_store(tmp / "misfeat", verify=False).manifest["prompts_per_shard"]
    how = Tokenizing.of(model, pset, "all")
    batches, n_tokens = [], 0
    for spec in plan_shards(len(pset), per_shard):
        enc = encode_prompts(pset.records[spec.first_prompt:spec.end_prompt], model, how, first=spec.first_prompt)
        rows = plan_rows(enc, "all")
        n_tokens += int(rows.forward_len.sum())
        batches += [b.tokens.to(args.device) for b in make_batches(enc, rows, pad_id=pad_id_of(model),
                                                                  batch_tokens=batch_tokens)]
    stop = last_layer_of([hook], model.cfg.n_layers)
    sequences, per_batch = saelens_tokens(model, pset, batch_tokens)
    c_tokens = len(sequences) * len(sequences[0])
    d = model.cfg.d_model
    sizes = [r.bytes for r in open_store(tmp / "misfeat", verify=False).shards]

    def run_cold() -> float:
        shutil.rmtree(os.environ["MISFEAT_TOKEN_CACHE"], ignore_errors=True)
        return run_misfeat(model, pset, hook, args.dtype, args.batch_tokens, tmp)

    runs = {
        "a": lambda: run_ceiling(model, batches, stop, args.device),
        "e": run_cold,
        "w": lambda: write_ceiling(tmp / "ceiling", sizes, fsync=True),
        "b": lambda: run_naive(model, pset, hook, args.device),
        "c": lambda: run_saelens(model, sequences, per_batch, hook, d, args.dtype, args.device, tmp),
        "d": lambda: run_misfeat(model, pset, hook, args.dtype, args.batch_tokens, tmp),
    }
    tokens = {"a": n_tokens, "b": n_tokens, "c": c_tokens, "d": n_tokens, "e": n_tokens, "w": n_tokens}
    methods = [m for m in METHODS if m in args.methods.split(",")]
    rates: dict[str, list[float]] = {m: [] for m in methods}
    runs["a"]()  # warm-up (misfeat ran once above): allocator, kernels, page cache
    for rep in range(repeats):
        k = rep % len(methods)
        for m in methods[k:] + methods[:k]:
            rates[m].append(tokens[m] / runs[m]())
        print(f"  {name} ({torch.get_num_threads()} threads) round {rep + 1}: "
              + ", ".join(f"{m} {rates[m][-1]:,.0f}" for m in methods), file=sys.stderr, flush=True)
    best = {m: max(v) for m, v in rates.items()}
    median = {m: statistics.median(v) for m, v in rates.items()}
    return {"model": name, "hook": hook, "prompts": len(pset), "tokens": tokens, "batch_tokens": batch_tokens,
            "threads": torch.get_num_threads(), "best": best, "median": median, "rates": rates}


def print_results(results: list[dict]) -> None:
    for r in results:
        print(f"\n{r['model']}, {r['hook']}, {r['threads']} thread(s): {r['prompts']} prompts, {r['tokens']['a']:,} tokens "
              f"(sae-lens: {r['tokens']['c']:,} in 128-token contexts), batch_tokens {r['batch_tokens']}")
        print("| method | best tokens/s | median tokens/s | (d) / method, best | (d) / method, median |")
        print("|---|---:|---:|---:|---:|")
        for m in r["best"]:
            rb = r["best"]["d"] / r["best"][m]
            rm = r["median"]["d"] / r["median"][m]
            print(f"| {LABELS[m]} | {r['best'][m]:,.0f} | {r['median'][m]:,.0f} | {rb:.2f} | {rm:.2f} |")
        if "a" in r["best"] and "w" in r["best"]:
            for m in ("d", "e"):
                if m in r["best"]:
                    limit = {k: min(r[k]["a"], r[k]["w"]) for k in ("best", "median")}
                    print(f"{LABELS[m]} / min(ceiling, write ceiling): best {r['best'][m] / limit['best']:.2f}, "
                          f"median {r['median'][m] / limit['median']:.2f}")


def rss_child(args) -> None:
    """In a child process: cache ``--rss-child`` prompts (or, with ``--rss-bare``, only run the
    bare forward over the same length-bucketed batches), print peak RSS (MiB) as JSON."""
    import resource

    import torch

    torch.set_num_threads(int(args.threads.split(",")[0]))
    from misfeat.activations import cache_activations
    from misfeat.models import load_model

    model = load_model("organism:chat", device=args.device)
    tmp = Path(args.tmp)
    prompts = make_chat_prompts(tmp / f"rss-{args.rss_child}.jsonl", args.rss_child, model, seed=1)
    hook = "blocks.1.hook_resid_post"
    if args.rss_bare:
        from misfeat.activations.plan import Tokenizing, encode_prompts, plan_rows
        from misfeat.activations.producer import default_batch_tokens, make_batches
        from misfeat.data import load_prompts, pad_id_of

        pset = load_prompts(prompts)
        how = Tokenizing.of(model, pset, "all")
        enc = encode_prompts(pset.records, model, how)
        rows = plan_rows(enc, "all")
        batches = (b.tokens for b in make_batches(enc, rows, pad_id=pad_id_of(model),
                                                  batch_tokens=default_batch_tokens(args.device.split(":")[0])))
        run_ceiling(model, batches, 2, args.device)
        n_rows, n_shards = int(rows.n_rows), 0
    else:
        store = tmp / f"rss-store-{args.rss_child}"
        shutil.rmtree(store, ignore_errors=True)  # a finished store would be resumed: nothing to measure
        result = cache_activations(model, prompts, [hook], store)
        n_rows, n_shards = result.n_rows, result.n_shards
    # VmHWM, not ru_maxrss: after fork+exec Linux keeps the parent's ru_maxrss (here, GBs)
    status = Path("/proc/self/status").read_text() if Path("/proc/self/status").exists() else ""
    hwm = [line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")]
    peak = int(hwm[0]) / 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"prompts": args.rss_child, "rows": n_rows, "shards": n_shards,
                      "store_mib": n_rows * 128 * 4 / 2**20, "peak_rss_mib": peak}))


def rss_test(args, tmp: Path) -> list[dict]:
    """Peak RSS of N and 4N prompts, ``--rss-repeats`` child processes each (sizes alternated).

    One pair of runs is not a measurement: glibc keeps freed forward temporaries in a heap
    whose fragmentation differs from run to run (docs/benchmarks.md, "Where the RSS growth
    comes from"), and the growth of single pairs ranged from +13% to +25% on one quiet machine.
    """
    import statistics

    sizes = (args.rss_prompts, 4 * args.rss_prompts)
    runs: dict[int, list[dict]] = {n: [] for n in sizes}
    bare: dict[int, list[float]] = {n: [] for n in sizes}
    for _ in range(args.rss_repeats):
        for n in sizes:
            for only_forward in (False, True):
                cmd = [sys.executable, __file__, "--rss-child", str(n), "--tmp", str(tmp),
                       "--threads", args.threads.split(",")[0], "--device", args.device]
                done = subprocess.run(cmd + ["--rss-bare"] * only_forward, capture_output=True, text=True,
                                      check=True)
                r = json.loads(done.stdout.strip().splitlines()[-1])
                if only_forward:
                    bare[n].append(r["peak_rss_mib"])
                else:
                    runs[n].append(r)
    print(f"\nPeak RSS of `cache_activations` (organism) in child processes, {args.rss_repeats} per size:")
    print("| prompts | rows | shards | store MiB | misfeat peak RSS MiB, median (runs) | "
          "bare forward only, median (runs) |")
    print("|---:|---:|---:|---:|---:|---:|")
    out = []
    for n in sizes:
        r, peaks = runs[n][0], [x["peak_rss_mib"] for x in runs[n]]
        out.append({**r, "peak_rss_mib": statistics.median(peaks), "peaks_mib": peaks,
                    "bare_peak_rss_mib": statistics.median(bare[n]), "bare_peaks_mib": bare[n]})
        print(f"| {n} | {r['rows']:,} | {r['shards']} | {r['store_mib']:.0f} | {statistics.median(peaks):.0f} "
              f"({', '.join(f'{p:.0f}' for p in peaks)}) | {statistics.median(bare[n]):.0f} "
              f"({', '.join(f'{p:.0f}' for p in bare[n])}) |")
    growth = out[1]["peak_rss_mib"] / out[0]["peak_rss_mib"] - 1
    bare_growth = out[1]["bare_peak_rss_mib"] / out[0]["bare_peak_rss_mib"] - 1
    pairs = [b["peak_rss_mib"] / a["peak_rss_mib"] - 1 for a, b in zip(runs[sizes[0]], runs[sizes[1]], strict=True)]
    print(f"4x the prompts: peak RSS {growth:+.1%} (medians; target < +20%); run by run "
          f"{', '.join(f'{g:+.1%}' for g in pairs)}; the bare forward over the same batches alone: "
          f"{bare_growth:+.1%}")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=2000, help="chat prompts for the organism (default 2000)")
    p.add_argument("--gpt2-prompts", type=int, default=48, help="chat prompts for the GPT-2-shaped model")
    p.add_argument("--gpt2-repeats", type=int, default=2,
                   help="rounds for the GPT-2-shaped model (its naive loop runs the 50k-word unembedding: slow)")
    p.add_argument("--models", default="organism,gpt2", help="organism, gpt2 or both (default)")
    p.add_argument("--repeats", type=int, default=None,
                   help="rounds of the methods (default 3 for the organism, 5 with --host-only)")
    p.add_argument("--threads", default="1,2",
                   help="torch intra-op thread counts, comma-separated; every method runs with each (default 1,2: "
                   "one thread, and torch's default on this 2-core machine)")
    p.add_argument("--methods", default="a,b,c,d,e", help="which methods to run (default a,b,c,d,e; "
                   "a,d: misfeat against its ceiling only; w: the write ceiling)")
    p.add_argument("--gpt2-layer", type=int, default=5, help="hooked layer of the GPT-2-shaped model (default 5)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", help="model and store dtype: float32 or bfloat16")
    p.add_argument("--batch-tokens", type=int, default=None, help="misfeat's (and the ceiling's) token budget")
    p.add_argument("--rss", action=argparse.BooleanOptionalAction, default=True, help="run the RSS test")
    p.add_argument("--rss-prompts", type=int, default=2000, help="N of the RSS test (N vs 4N prompts)")
    p.add_argument("--rss-repeats", type=int, default=3, help="child processes per size of the RSS test (default 3)")
    p.add_argument("--rss-only", action="store_true", help="run only the RSS test")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    host = p.add_argument_group("host-only (issue 20): misfeat's own work against the disk's write ceiling")
    host.add_argument("--host-only", action="store_true",
                      help="replace the forward by a near-free stand-in and compare with a plain writer "
                      "(see scripts/bench_cache_host.py)")
    host.add_argument("--widths", default="128,768,4096", help="hook widths (default 128,768,4096)")
    host.add_argument("--dtypes", default="float32,bfloat16", help="store dtypes (default float32,bfloat16)")
    host.add_argument("--store-mb", type=float, default=128, help="store size per run in MiB (default 128)")
    host.add_argument("--baseline", metavar="D:DTYPE=TPS,...",
                      help="pre-session host-only tokens/s to compare with (default: the recorded "
                      "768:bfloat16=279389, code at 96f1d54)")
    p.add_argument("--rss-child", type=int, help=argparse.SUPPRESS)
    p.add_argument("--rss-bare", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tmp", help="directory for prompts and stores (default: the system's temp directory)")
    args = p.parse_args()
    if args.rss_repeats < 1:
        p.error(f"--rss-repeats must be at least 1, not {args.rss_repeats}")
    if args.rss_child:
        rss_child(args)
        return 0
    if args.host_only:
        from bench_cache_host import main as host_main

        args.repeats = args.repeats or 5
        return host_main(args, make_chat_prompts)
    import torch

    args.repeats = args.repeats or 3
    load = os.getloadavg()
    started = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="bench_cache_", dir=args.tmp))
    os.environ["MISFEAT_TOKEN_CACHE"] = str(tmp / "tokens")  # never the user's
    try:
        if args.rss_only:
            rss_test(args, tmp)
            return 0
        organism, models = load_models(args.models.split(","), args.device, args.dtype, args.gpt2_layer)
        results = []
        for name, model, hook in models:
            gpt2 = name.startswith("GPT-2")
            n = args.gpt2_prompts if gpt2 else args.prompts
            prompts = make_chat_prompts(tmp / f"chat-{n}.jsonl", n, organism)
            for threads in (int(t) for t in args.threads.split(",")):
                torch.set_num_threads(threads)
                results.append(bench_model(name, model, hook, prompts, args.gpt2_repeats if gpt2 else args.repeats,
                                           args, tmp))
        print(f"\nmachine: {os.cpu_count()} CPUs, torch {torch.__version__}, threads {args.threads}, "
              f"device {args.device}, dtype {args.dtype}; load average before {load[0]:.2f}, after "
              f"{os.getloadavg()[0]:.2f}")
        print_results(results)
        rss = rss_test(args, tmp) if args.rss else None
        print(f"\ntotal {time.time() - started:.0f} s")
        if args.json:
            Path(args.json).write_text(json.dumps({"results": results, "rss": rss, "load_before": load,
                                                   "load_after": os.getloadavg()}, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
