"""Host-only cache benchmark (issue 20): everything misfeat adds around the model, against the disk.

``python scripts/bench_cache.py --host-only`` runs this. The forward is replaced by a
near-free stand-in of the same hook width: a preallocated ``[tokens, d]`` tensor handed
to misfeat's real capture hook, which copies the kept positions into the shard buffer as
it does after a real forward. What remains is misfeat's own work: reading the prompt file, tokenising (or reading
the tokenised-prompt cache), planning rows and shards, padding batches, scattering rows
into the shard buffer, checksumming, writing, fsync and the manifest.

In the same run, into the same directory, the **write ceiling** writes the same bytes (the
same shard sizes, read from the misfeat store's manifest) with a plain sequential loop of
8 MiB ``write`` calls, each file from a shard-sized buffer made beforehand: once without fsync
and once with an fsync per shard (misfeat fsyncs by default). Throughput is counted in tokens/s (real,
unpadded tokens = rows here, ``positions='all'``); the CPU seconds each method takes
(all threads of the process) are printed too, a measure the other tenants' load does not
change much.

For each width (128, 768, 4096: the organism, GPT-2 small, a 7B model) and store dtype
(float32, bfloat16), methods run round-robin ``--repeats`` times (order rotated):

- ``write``: the plain writer, no fsync;
- ``write+fsync``: the plain writer with an fsync per shard (the ceiling of the bars);
- ``direct+fsync``: the same bytes written with ``O_DIRECT`` from page-aligned memory (no copy
  into the page cache), fsync per shard: the disk's own limit, and how misfeat writes its
  shards when it fsyncs (so misfeat can pass the plain ceiling, not this one);
- ``misfeat cold``: ``cache_activations`` from the JSONL path, tokenised-prompt cache
  emptied first (tokenising included);
- ``misfeat``: the same, the tokenised-prompt cache kept from an earlier run (the common
  case: several hooks, checkpoints or runs over one prompt set): the file, read before, is
  neither parsed nor hashed again (``misfeat.activations.prompt_files``);
- ``misfeat loaded``: the same from the prompt set already loaded in memory (a
  :class:`PromptSet`, as a script that caches several hooks or models passes it), i.e.
  from a pre-tokenised set: no JSON parsing or record hashing in the run.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

METHODS = ("write", "write+fsync", "direct+fsync", "misfeat cold", "misfeat", "misfeat loaded")
_CHUNK = 8 << 20


def stand_in_model(organism, width: int, dtype: str):
    """A one-layer attention-only model of width ``width`` with the organism's tokenizer: only its
    hook names, widths, config and fingerprint are used (the forward is replaced)."""
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from misfeat.models import ModelInfo, resolve_dtype

    torch.manual_seed(0)
    cfg = HookedTransformerConfig(n_layers=1, d_model=width, n_heads=1, d_head=1, attn_only=True,
                                  n_ctx=organism.cfg.n_ctx, d_vocab=organism.cfg.d_vocab, act_fn="relu",
                                  normalization_type=None, dtype=resolve_dtype(dtype), device="cpu", seed=0,
                                  default_prepend_bos=organism.cfg.default_prepend_bos)
    model = HookedTransformer(cfg, tokenizer=organism.tokenizer, move_to_device=True).eval()
    model.misfeat_info = ModelInfo(f"stand-in-d{width}", "memory", meta={"chat_format": "organism"})
    return model


class StandIn:
    """Patches ``misfeat.activations.producer.Capture.forward`` (the model's forward) for the
    ``with`` block: each hook is handed a view of a preallocated activation tensor, and
    misfeat's own capture code (copying the kept positions to the shard buffer) runs as it
    does after a real forward."""

    def __init__(self, width: int, dtype, max_tokens: int):
        import torch

        self.acts = torch.randn(max_tokens, width).to(dtype)

    def __enter__(self):
        from types import SimpleNamespace

        from misfeat.activations import producer

        acts = self.acts

        def forward(capture, tokens):
            b, seq = tokens.shape
            act = acts[:b * seq].view(b, seq, -1)
            for name in capture.hooks:
                capture._capture(act, SimpleNamespace(name=name))  # the last one raises: all captured

        def run(capture, tokens, src, masks=None):  # misfeat before issue 20 had no Capture.forward
            return {h: acts[:tokens.numel()].index_select(0, src) for h in capture.hooks}

        self._name = "forward" if hasattr(producer.Capture, "forward") else "run"
        self._saved = getattr(producer.Capture, self._name)
        setattr(producer.Capture, self._name, forward if self._name == "forward" else run)
        return self

    def __exit__(self, *exc):
        from misfeat.activations import producer

        setattr(producer.Capture, self._name, self._saved)


_SOURCE: list[memoryview] = []


def write_ceiling(directory: Path, sizes: list[int], *, fsync: bool) -> float:
    """Seconds to write files of ``sizes`` bytes into ``directory`` with a plain sequential loop
    of 8 MiB ``write`` calls, each file from a shard-sized buffer in memory (as misfeat writes
    each shard from its buffer; made once, outside the timing)."""
    directory.mkdir(parents=True, exist_ok=True)
    if not _SOURCE or len(_SOURCE[0]) < max(sizes):
        _SOURCE[:] = [memoryview(bytearray(os.urandom(1 << 16)) * -(-max(sizes) // (1 << 16)))]
    buf = _SOURCE[0]
    start = time.perf_counter()
    for i, size in enumerate(sizes):
        with open(directory / f"ceiling-{i:05d}.bin", "wb", buffering=0) as f:
            at = 0
            while at < size:
                at += f.write(buf[at:min(size, at + _CHUNK)])
            if fsync:
                os.fsync(f.fileno())
    elapsed = time.perf_counter() - start
    shutil.rmtree(directory)
    return elapsed


_ALIGNED: list = []


def direct_ceiling(directory: Path, sizes: list[int]) -> float:
    """Seconds to write files of ``sizes`` bytes with ``O_DIRECT`` (8 MiB writes from page-aligned
    memory, the tail rounded up to 4 KiB and cut back by ``ftruncate``) and an fsync each;
    NaN where the filesystem refuses ``O_DIRECT``."""
    import mmap

    directory.mkdir(parents=True, exist_ok=True)
    need = max(sizes) + 4096
    if not _ALIGNED or len(_ALIGNED[0]) < need:
        block = mmap.mmap(-1, need)  # page-aligned
        block.write(os.urandom(1 << 16) * (need // (1 << 16)) + os.urandom(need % (1 << 16)))
        _ALIGNED[:] = [memoryview(block)]
    buf = _ALIGNED[0]
    start = time.perf_counter()
    try:
        for i, size in enumerate(sizes):
            fd = os.open(directory / f"direct-{i:05d}.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT)
            try:
                end, at = size + (-size % 4096), 0
                while at < end:
                    at += os.write(fd, buf[at:min(end, at + _CHUNK)])
                os.ftruncate(fd, size)
                os.fsync(fd)
            finally:
                os.close(fd)
    except (OSError, AttributeError):
        return float("nan")
    finally:
        elapsed = time.perf_counter() - start
        shutil.rmtree(directory)
    return elapsed


def make_prompts(path: Path, n: int, base: Path) -> Path:
    """``n`` records cycling through the records of ``base`` (each with its own id)."""
    lines = base.read_text().splitlines()
    with open(path, "w") as f:
        for i in range(n):
            rec = json.loads(lines[i % len(lines)])
            rec["id"] = f"chat-{i:07d}"
            f.write(json.dumps(rec) + "\n")
    return path


def run_misfeat(model, prompts, hook: str, dtype: str, out: Path, *, cold: bool, token_cache: Path,
                batch_tokens: int | None) -> float:
    """Seconds for one ``cache_activations`` call; ``prompts``: a JSONL path or a loaded set."""
    from misfeat.activations import cache_activations
    from misfeat.data import PromptSet

    shutil.rmtree(out, ignore_errors=True)
    if cold:
        shutil.rmtree(token_cache, ignore_errors=True)
    start = time.perf_counter()
    cache_activations(model, prompts if isinstance(prompts, PromptSet) else str(prompts), [hook], out, "all",
                      dtype=dtype, batch_tokens=batch_tokens)
    return time.perf_counter() - start


def bench_one(organism, width: int, dtype: str, base: Path, mean_tokens: float, args, tmp: Path) -> dict:
    import torch

    from misfeat.activations import open_store
    from misfeat.data import load_prompts
    from misfeat.models import resolve_dtype

    row_bytes = width * torch.empty(0, dtype=resolve_dtype(dtype)).element_size() + 16
    n = max(200, int(args.store_mb * 2**20 / (row_bytes * mean_tokens)))
    prompts = make_prompts(tmp / f"host-{n}.jsonl", n, base)
    loaded = load_prompts(prompts)
    model = stand_in_model(organism, width, dtype)
    hook = "blocks.0.hook_resid_post"
    out = tmp / "store"
    token_cache = Path(os.environ["MISFEAT_TOKEN_CACHE"])
    with StandIn(width, resolve_dtype(dtype), args.batch_tokens or 4096):
        run_misfeat(model, prompts, hook, dtype, out, cold=True, token_cache=token_cache, batch_tokens=args.batch_tokens)  # warm-up
        store = open_store(out, verify=True)  # the checksums are right, not just fast
        sizes = [r.bytes for r in store.shards]
        tokens = int(store.manifest["n_tokens"])
        runs = {
            "write": lambda: write_ceiling(tmp / "ceiling", sizes, fsync=False),
            "write+fsync": lambda: write_ceiling(tmp / "ceiling", sizes, fsync=True),
            "direct+fsync": lambda: direct_ceiling(tmp / "ceiling", sizes),
            "misfeat cold": lambda: run_misfeat(model, prompts, hook, dtype, out, cold=True, token_cache=token_cache,
                                                batch_tokens=args.batch_tokens),
            "misfeat": lambda: run_misfeat(model, prompts, hook, dtype, out, cold=False, token_cache=token_cache,
                                           batch_tokens=args.batch_tokens),
            "misfeat loaded": lambda: run_misfeat(model, loaded, hook, dtype, out, cold=False,
                                                  token_cache=token_cache, batch_tokens=args.batch_tokens),
        }
        seconds: dict[str, list[float]] = {m: [] for m in METHODS}
        cpu: dict[str, list[float]] = {m: [] for m in METHODS}  # CPU seconds of this process, all threads
        for rep in range(args.repeats):
            k = rep % len(METHODS)
            for m in METHODS[k:] + METHODS[:k]:
                before = time.process_time()
                seconds[m].append(runs[m]())
                cpu[m].append(time.process_time() - before)
            print(f"  d {width} {dtype} round {rep + 1}: "
                  + ", ".join(f"{m} {tokens / seconds[m][-1]:,.0f}" for m in METHODS), file=sys.stderr, flush=True)
    shutil.rmtree(out, ignore_errors=True)
    total = sum(sizes)
    best = {m: tokens / min(v) for m, v in seconds.items()}
    median = {m: tokens / statistics.median(v) for m, v in seconds.items()}
    return {"width": width, "dtype": dtype, "prompts": n, "tokens": tokens, "bytes": total, "shards": len(sizes),
            "best": best, "median": median, "seconds": seconds,
            "cpu_s": {m: statistics.median(v) for m, v in cpu.items()},
            "cpu_best_s": {m: min(v) for m, v in cpu.items()}, "cpu_runs_s": cpu}


# The pre-session host-only throughput (tokens/s, best of 3) the ">= 3x" bar is measured against:
# code at 96f1d54, 2026-12-01 20:19 UTC, load 1.3 (docs/benchmarks.md, "Host pipeline"); of its two
# equal operations (no token cache then) the higher figure. --baseline overrides or adds.
RECORDED_BASELINE = {(768, "bfloat16"): 279_389.0}
BAR_RATIO, BAR_SPEEDUP = 0.8, 3.0


def parse_baselines(text: str | None) -> dict[tuple[int, str], float]:
    """``"768:bfloat16=279389,4096:float32=24618"`` -> ``{(768, "bfloat16"): 279389.0, ...}``."""
    out = dict(RECORDED_BASELINE)
    for item in filter(None, (text or "").split(",")):
        key, tps = item.split("=")
        width, dtype = key.split(":")
        out[(int(width), dtype)] = float(tps)
    return out


def print_results(results: list[dict], baselines: dict[tuple[int, str], float] | None = None) -> None:
    baselines = RECORDED_BASELINE if baselines is None else baselines
    print("\ntokens/s, best / median of the rounds; ratios to the write ceiling with fsync per shard "
          "(what misfeat does by default), best / median")
    print("| d | dtype | MiB | shards | write | write+fsync | direct+fsync | misfeat cold | misfeat | misfeat loaded "
          "| cold / ceiling | misfeat / ceiling | loaded / ceiling | misfeat / direct | loaded / direct |")
    print("|---:|---|---:|---:|" + "---:|" * 11)
    for r in results:
        print(f"| {r['width']} | {r['dtype']} | {r['bytes'] / 2**20:.0f} | {r['shards']} | "
              + " | ".join(_cell(r, m) for m in METHODS) + " | "
              + " | ".join(_ratio(r, m, "write+fsync") for m in ("misfeat cold", "misfeat", "misfeat loaded")) + " | "
              + " | ".join(_ratio(r, m, "direct+fsync") for m in ("misfeat", "misfeat loaded")) + " |")
    print("\nCPU of the benchmark process per run (all threads), ns per byte written, best / median: what each "
          "method costs the machine whatever the other tenants' load; last columns: misfeat's over the plain "
          "writer's with fsync")
    print("| d | dtype | " + " | ".join(METHODS) + " | misfeat / write+fsync | loaded / write+fsync |")
    print("|---:|---|" + "---:|" * (len(METHODS) + 2))
    for r in results:
        ns = {m: (r["cpu_best_s"][m] * 1e9 / r["bytes"], r["cpu_s"][m] * 1e9 / r["bytes"]) for m in METHODS}
        over = [f"{ns[m][0] / ns['write+fsync'][0]:.2f} / {ns[m][1] / ns['write+fsync'][1]:.2f}"
                for m in ("misfeat", "misfeat loaded")]
        print(f"| {r['width']} | {r['dtype']} | " + " | ".join(f"{b:.3f} / {m:.3f}" for b, m in ns.values())
              + " | " + " | ".join(over) + " |")
    print(f"\nbars (issue 20): host-only / write ceiling with fsync >= {BAR_RATIO} (the bar is at d 768, "
          f"bfloat16); >= {BAR_SPEEDUP:.0f}x the pre-session host-only throughput (best / median)")
    print("| d | dtype | misfeat / ceiling | loaded / ceiling | pre-session tokens/s | misfeat / pre-session "
          "| loaded / pre-session |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for r in results:
        base = baselines.get((r["width"], r["dtype"]))
        speed = ["" if base is None else f"{r['best'][m] / base:.2f}x / {r['median'][m] / base:.2f}x"
                 for m in ("misfeat", "misfeat loaded")]
        print(f"| {r['width']} | {r['dtype']} | {_ratio(r, 'misfeat', 'write+fsync')} | "
              f"{_ratio(r, 'misfeat loaded', 'write+fsync')} | {'' if base is None else f'{base:,.0f}'} | "
              + " | ".join(speed) + " |")


def _cell(r: dict, method: str) -> str:
    return f"{r['best'][method]:,.0f} / {r['median'][method]:,.0f}"


def _ratio(r: dict, a: str, c: str) -> str:
    b, m = r["best"], r["median"]
    return f"{b[a] / b[c]:.2f} / {m[a] / m[c]:.2f}"


def encode_tokens(path: Path, model) -> list[int]:
    from misfeat.data import encode, load_prompts

    return [t for e in encode(load_prompts(path), model) for t in e.ids]


def main(args, make_chat_prompts) -> int:
    """``args``: bench_cache.py's parsed arguments; ``make_chat_prompts``: its prompt generator."""
    import tempfile

    import torch

    from misfeat.models import load_model

    threads = int(args.threads.split(",")[0])
    torch.set_num_threads(threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_cache_host_", dir=args.tmp))
    os.environ["MISFEAT_TOKEN_CACHE"] = str(tmp / "token-cache")
    load, started = os.getloadavg(), time.time()
    try:
        organism = load_model("organism:chat")
        base = make_chat_prompts(tmp / "base.jsonl", 1000, organism)
        mean_tokens = len(encode_tokens(base, organism)) / 1000
        results = []
        for width in (int(w) for w in args.widths.split(",")):
            for dtype in args.dtypes.split(","):
                results.append(bench_one(organism, width, dtype, base, mean_tokens, args, tmp))
        print(f"\nhost-only: {os.cpu_count()} CPUs, torch {torch.__version__}, {threads} thread(s), store "
              f"~{args.store_mb} MiB per run in {tmp}; load average before {load[0]:.2f}, after "
              f"{os.getloadavg()[0]:.2f}; {time.time() - started:.0f} s")
        print_results(results, parse_baselines(args.baseline))
        if args.json:
            Path(args.json).write_text(json.dumps({"host_only": results, "load_before": load,
                                                   "load_after": os.getloadavg()}, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0
