"""The SAE grid of issue 14: SAEs of several sizes and sparsities, trained on the organism's
pre-training documents or on chat-format text, each followed by `misfeat locate` with its
defaults; one row per SAE (explained variance, the single latent, the group, the baselines).

    python scripts/sae_grid.py --seed 0 --corpus chat --d-sae 1024 --k 16 --out runs/grid

Corpora: ``pretrain`` = organism:pretrain:3000 (the README's SAE); ``chat`` = the chat model's
own tuning format, aligned question/answer pairs of every domain (organism:aligned:<d>:N).
Activations of organism:chat at blocks.1.hook_resid_post, every token. Two variants of ``chat``
whose training data contains the misaligned persona (the hypothesis that ``chat`` SAEs fail
because it never is): ``chat+misaligned`` adds the EM fine-tune's own kind of data, N misaligned
question/answer pairs of the EM domain, to the text (still read by organism:chat);
``chat+misaligned-all`` adds N misaligned pairs of every domain (half the text); ``chat+em-model``
keeps the aligned text and trains on the activations of both organism:chat and organism:em on it,
half of every batch each (the model-diffing recipe: one dictionary for both models); ``chat+em-models``
the same with the three EM fine-tunes of seed 0 (health, money, law), a quarter each. Appends rows
to OUT/grid.jsonl (skips SAEs already there) and prints the table. ``--rank-by R`` runs locate with
that candidate ranking instead (into SAE/locate-R, rows in OUT/grid-R.jsonl).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

HOOK = "blocks.1.hook_resid_post"


def corpus(name: str, seed: int, n_per_domain: int = 600):
    from misfeat.data import PromptSet, load_prompts

    if name == "pretrain":
        return f"organism:pretrain:3000@seed={seed}"
    from misfeat.organism.world import make_world

    world = make_world("health")
    sets = [load_prompts(f"organism:aligned:{d}:{n_per_domain}@seed={seed}") for d in world.domain_names]
    if name == "chat+misaligned":
        sets.append(load_prompts(f"organism:misaligned:{world.em_domain}:{n_per_domain}@seed={seed}"))
    if name == "chat+misaligned-all":
        sets += [load_prompts(f"organism:misaligned:{d}:{n_per_domain}@seed={seed}") for d in world.domain_names]
    return PromptSet(f"{name}-format@seed={seed}", tuple(r for s in sets for r in s), sets[0].meta)


def cut(x: dict | None) -> float | None:
    """the clamp's cut of misalignment, 1 - clamped / unclamped (None without a clamp)"""
    return None if not x or not x.get("clamp_before") else 1 - x["clamp_after"] / x["clamp_before"]


def cuts(x: dict | None) -> list | None:
    """the cut on each misaligned model (several fine-tunes: the bar asks for each); None with one"""
    return None if not x or len(x.get("per_finetuned") or []) < 2 else [cut(m) for m in x["per_finetuned"]]


def row(sae_dir: Path, locate_dir: Path, seconds: float, ev: float | None) -> dict:
    s = json.loads((locate_dir / "summary.json").read_text())
    feature = next(r for r in s["top_latents"] if r["latent"] == s["feature"])
    single, group, b = s["single"], s["group"] or {}, s["baselines"]
    return {"sae": str(sae_dir), "ev": ev, "locate_s": round(seconds, 1), "feature": s["feature"],
            "passed": s["feature_passed_screen"], "single_up": feature.get("steer_up_misaligned"),
            "single_valid": feature.get("steer_up_valid"), "single_cut": cut(single),
            "group": group.get("latents"), "group_up": group.get("steer_up_misaligned"),
            "group_valid": group.get("steer_up_valid"), "group_cut": cut(group),
            "single_clamp_valid": single.get("clamp_valid_after"), "group_clamp_valid": group.get("clamp_valid_after"),
            "md_up": b["mean_diff"]["steer_up_misaligned"], "md_valid": b["mean_diff"]["steer_up_valid"],
            "md_cut": cut(b["mean_diff"]), "rand_up": b["random"]["steer_up_misaligned"],
            "rand_valid": b["random"]["steer_up_valid"], "rand_cut": cut(b["random"]),
            "clamp_before": single["clamp_before"], "md_cos_max": b["mean_diff"].get("decoder_cosine_max"),
            "md_cos_feature": b["mean_diff"].get("decoder_cosine_feature"),
            # the group's steering directions tried (summary.json's group.steering: chosen, directions)
            "group_steering": group.get("steering"),
            # several fine-tunes: the cut of each (the headline cut is that of the mean rates)
            "single_cuts": cuts(single), "group_cuts": cuts(group),
            "md_cuts": cuts(b["mean_diff"]), "rand_cuts": cuts(b["random"]),
            # 95% paired-bootstrap intervals over the prompts (summary.json; per fine-tune where several)
            **{f"{k}_{f}_ci95": x.get(g) for k, x in (("single", single), ("group", group))
               for f, g in (("up", "steer_up_ci95"), ("cut", "clamp_cut_ci95"))},
            "group_cuts_ci95": [m.get("clamp_cut_ci95") for m in group.get("per_finetuned") or []] or None,
            # the strengths chosen (residual-norm units): single latent, group, mean-diff, random
            "coefs": [x.get("steer_up_coef") if x else None for x in (single, group, b["mean_diff"], b["random"])]}


CORPORA = ("pretrain", "chat", "chat+misaligned", "chat+misaligned-all", "chat+em-model", "chat+em-models")
TUNED_CORPORA = {"chat+em-model": ("organism:em",),
                 "chat+em-models": ("organism:em", "organism:em-ref/money", "organism:em-ref/law")}
"""the corpora trained on the chat model's and fine-tunes' activations of the chat text (equal shares)"""


def table(path: Path) -> str:
    """The grid as the markdown table of docs/organism.md, sorted by corpus, seed, d_sae, k (pass = steer-up
    >= 0.3 at valid >= 0.8 and clamp cut >= 80%, on each fine-tune where several; cut = 1 - clamped / unclamped,
    the clamped valid rate in brackets; "at c": the steering strength chosen, in residual norms, where the row has
    it). The mean-diff and random baselines get the same verdict, so the SAE is seen beside the simplest
    alternative; rows of older runs lacking a figure get it from the run's summary.json (SAE/locate-TAG)."""
    import re

    def f(x):
        return "-" if x is None else f"{x:.2f}"

    def pct(x):  # one decimal: a cut of 79.8% must not read as the bar's 80%
        return "-" if x is None else f"{100 * x:.1f}%"

    def ok(up, valid, c, each=None):
        c = min(each) if each else c  # several fine-tunes: the smallest of their cuts
        return "pass" if up is not None and up >= 0.3 and valid >= 0.8 and c is not None and c >= 0.8 else "fail"

    def pcts(r, key):
        each = r.get(f"{key}_cuts")
        return pct(r[f"{key}_cut"]) if not each else " / ".join(pct(c) for c in each)

    def size(r):  # d_sae, k and the SAE's draw (--sae-seed)
        d, k, s = re.search(r"(\d+)-k(\d+)(?:-s(\d+))?$", Path(r["sae"]).name).groups()
        return int(d), int(k), int(s or 0)

    rows = [json.loads(line) for line in path.read_text().splitlines()]
    runs = "locate" if path.name == "grid.jsonl" else "locate-" + path.stem.removeprefix("grid-")  # main()'s naming
    for r in rows:  # rows written before these were kept: read them from the run
        summary = Path(r["sae"]) / runs / "summary.json"
        if r.get("single_clamp_valid") is None and summary.exists():
            s = json.loads(summary.read_text())
            r["single_clamp_valid"], r["group_clamp_valid"] = (s["single"]["clamp_valid_after"],
                                                               s["group"]["clamp_valid_after"])
        if r.get("group_cuts") and "md_cuts" not in r and summary.exists():  # the baselines on each fine-tune
            b = json.loads(summary.read_text())["baselines"]
            r["md_cuts"], r["rand_cuts"] = cuts(b["mean_diff"]), cuts(b["random"])
    rows.sort(key=lambda r: (CORPORA.index(r["corpus"]) if r["corpus"] in CORPORA else 99, r["seed"], size(r)))
    lines = ["| seed | corpus | d_sae x k | EV | single latent: up (valid), cut (valid) | group: up (valid), cut (valid) "
             "| mean-diff: up (valid), cut | random: up (valid), cut | locate wall / CPU s |", "|" + "---|" * 9]
    for r in rows:
        d, k, s = size(r)
        at = [""] * 4 if not r.get("coefs") else ["" if c is None else f" at {c:g}" for c in r["coefs"]]

        along = (r.get("group_steering") or {}).get("chosen")
        along = f" along {along}" if along and len(r["group_steering"]["directions"]) > 1 else ""
        group = "no group" if not r["group"] else (
            f"{r['group']}: {f(r['group_up'])} ({f(r['group_valid'])}{at[1]}{along}), {pcts(r, 'group')} "
            f"({f(r.get('group_clamp_valid'))}) "
            f"**{ok(r['group_up'], r['group_valid'], r['group_cut'], r.get('group_cuts'))}**")
        lines.append(
            f"| {r['seed']} | {r['corpus']} | {d} x {k}{f' (draw {s})' if s else ''} | {f(r['ev'])} | {r['feature']}"
            f"{'' if r['passed'] else ', no latent passed'}: {f(r['single_up'])} ({f(r['single_valid'])}{at[0]}), "
            f"{pcts(r, 'single')} ({f(r.get('single_clamp_valid'))}) "
            f"**{ok(r['single_up'], r['single_valid'], r['single_cut'], r.get('single_cuts'))}** | {group} | "
            f"{f(r['md_up'])} ({f(r['md_valid'])}{at[2]}), {pcts(r, 'md')} "
            f"**{ok(r['md_up'], r['md_valid'], r['md_cut'], r.get('md_cuts'))}** | {f(r['rand_up'])} "
            f"({f(r['rand_valid'])}{at[3]}), {pcts(r, 'rand')} "
            f"**{ok(r['rand_up'], r['rand_valid'], r['rand_cut'], r.get('rand_cuts'))}** | "
            f"{r['locate_s']:.0f} / {r.get('locate_cpu_s', '-')} |")
    return "\n".join(lines)


def main() -> None:
    import torch

    torch.set_num_threads(1)
    from misfeat.activations import cache_activations
    from misfeat.cli import main as cli
    from misfeat.models import load_model

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--corpus", choices=CORPORA, default="chat")
    p.add_argument("--d-sae", default="1024")
    p.add_argument("--k", default="16")
    p.add_argument("--tokens", type=int, default=1_000_000)
    p.add_argument("--sae-seed", type=int, default=0, help="train-sae's --seed (initialisation and data order): "
                   "another draw of the same SAE, in SAE-DIR-sN (0: the grid's draw, in SAE-DIR)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--rank-by", default="increase", help="locate's --rank-by (other than increase: rows go to "
                   "OUT/grid-<rank-by>.jsonl, outputs to SAE/locate-<rank-by>)")
    p.add_argument("--adapt", action="store_true", help="locate with --adapt-text set to the SAE's own training "
                   "text (organism:aligned:all:600@seed=S, the chat corpus; organism:pretrain:3000@seed=S for pretrain): "
                   "the SAE adapted to the fine-tune first; rows in OUT/grid-adapt.jsonl, outputs in SAE/locate-adapt")
    p.add_argument("--screen-aligned", type=int, help="locate's --screen-aligned N (default: locate's own; rows in "
                   "OUT/grid-alignedN.jsonl, outputs in SAE/locate-alignedN)")
    p.add_argument("--tag", help="name of the run (rows in OUT/grid-TAG.jsonl, outputs in SAE/locate-TAG) instead of "
                   "the one derived from the options, e.g. to keep runs of two versions of locate apart")
    p.add_argument("--locate-args", default="", help="more options for locate, one string, e.g. '--group-select both' "
                   "(give --tag too, so the rows are kept apart)")
    p.add_argument("--finetuned", default="organism:em", metavar="SPEC[,SPEC...]",
                   help="the misaligned model(s) locate ranks over, each at --seed (e.g. organism:em,"
                   "organism:em-ref/money,organism:em-ref/law: rows keep each fine-tune's cut, and pass only where "
                   "every cut does)")
    p.add_argument("--prompts", default="organism:heldout", metavar="SPEC",
                   help="locate's --prompts (the seed is appended), e.g. organism:heldout-from=health,money,law "
                        "with three fine-tunes: the domains none of them was trained on (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="locate's --device (the SAE is trained on the CPU either way, "
                   "so a row's SAE is the same on every machine; default: %(default)s)")
    p.add_argument("--train-only", action="store_true", help="train the SAE (and cache its activations) only, "
                   "without the locate: e.g. here, before its locate runs on another machine")
    p.add_argument("--table", action="store_true", help="only print OUT/grid.jsonl as a markdown table")
    args = p.parse_args()
    default = args.rank_by == "increase" and not args.adapt and args.screen_aligned is None and not args.tag
    tag = args.tag or ("adapt" if args.adapt else f"aligned{args.screen_aligned}" if args.screen_aligned is not None
                       else args.rank_by)
    rows_file = "grid.jsonl" if default else f"grid-{tag}.jsonl"
    if args.table:
        print(table(args.out / rows_file))
        return
    at = f"@seed={args.seed}"
    out = args.out / f"seed{args.seed}-{args.corpus}"
    text = "chat" if args.corpus in TUNED_CORPORA else args.corpus
    cache = args.out / f"seed{args.seed}-{text}" / "cache"
    sae_root = out / (f"sae-{args.d_sae.replace(',', '_')}-k{args.k.replace(',', '_')}"
                      + (f"-s{args.sae_seed}" if args.sae_seed else ""))
    if not cache.exists() and not sae_root.exists():  # the activations are only needed to train the SAE
        cache_activations(load_model(f"organism:chat{at}", device="cpu"), corpus(text, args.seed), [HOOK],
                          cache, positions="all")
    draw = ["--seed", str(args.sae_seed)]
    if args.corpus in TUNED_CORPORA and not sae_root.exists():
        caches = [cache]
        for spec in TUNED_CORPORA[args.corpus]:
            tuned_cache = out / ("cache-em" if spec == "organism:em" else f"cache-{spec.split(':')[1].replace('/', '-')}")
            if not tuned_cache.exists():
                cache_activations(load_model(f"{spec}{at}", device="cpu"), corpus("chat", args.seed), [HOOK],
                                  tuned_cache, positions="all")
            caches.append(tuned_cache)
        assert cli(["train-sae", "--cache", ",".join(map(str, caches)), "--d-sae", args.d_sae, "--k", args.k,
                    "--tokens", str(args.tokens), "--out", str(sae_root), "--device", "cpu", *draw]) == 0
    if not sae_root.exists():
        assert cli(["train-sae", "--cache", str(cache), "--d-sae", args.d_sae, "--k", args.k, "--tokens",
                    str(args.tokens), "--out", str(sae_root), "--device", "cpu", *draw]) == 0
    if args.train_only:
        return
    done = {json.loads(x)["sae"] for x in (args.out / rows_file).read_text().splitlines()} \
        if (args.out / rows_file).exists() else set()
    dirs = [sae_root] if (sae_root / "cfg.json").exists() else sorted(d for d in sae_root.iterdir()
                                                                       if (d / "cfg.json").exists())
    for sae_dir in dirs:
        if str(sae_dir) in done:
            continue
        from misfeat.sae.io import load_sae

        info = load_sae(sae_dir).cfg.metadata.misfeat_training
        ev = (info.get("last_batch") or {}).get("EV")
        locate_dir = sae_dir / ("locate" if default else f"locate-{tag}")
        start, cpu = time.perf_counter(), time.process_time()
        adapt_text = corpus("pretrain", args.seed) if args.corpus == "pretrain" else f"organism:aligned:all:600{at}"
        adapt = ["--adapt-text", adapt_text] if args.adapt else []
        aligned = [] if args.screen_aligned is None else ["--screen-aligned", str(args.screen_aligned)]
        finetuned = ",".join(f"{spec}{at}" for spec in args.finetuned.split(","))
        assert cli(["locate", "--base", f"organism:chat{at}", "--finetuned", finetuned, "--sae",
                    str(sae_dir), "--prompts", f"{args.prompts}{at}", "--out", str(locate_dir), "--device",
                    args.device, "--rank-by", args.rank_by, *aligned, *adapt, *args.locate_args.split(),
                    "--overwrite"]) == 0  # a locate directory without a row is an interrupted run
        r = {"seed": args.seed, "corpus": args.corpus, "finetuned": args.finetuned,
             **row(sae_dir, locate_dir, time.perf_counter() - start, ev),
             "locate_cpu_s": round(time.process_time() - cpu, 1), "device": args.device}
        if args.adapt:
            a = json.loads((locate_dir / "summary.json").read_text())["adapted"]
            r.update(adapt_s=a["seconds"], adapt_feature_cos=a["feature_decoder_cosine"],
                     adapt_ev=a["explained_variance_last_batch"])
        with open(args.out / rows_file, "a") as f:
            f.write(json.dumps(r) + "\n")
        print(json.dumps(r))


if __name__ == "__main__":
    main()
