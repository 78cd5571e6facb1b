"""The issue's bars for the dynamics protocols on the organism, judged from a summary, and their figures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from misfeat.plots import figure

INF = float("inf")


def _by_seed(rows: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    out: dict[int, list] = {}
    for r in rows:
        out.setdefault(r["seed"], []).append(r)
    return out


def _priming_bars(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The priming and rebound bars of one direction's arms, per seed."""
    bars: dict[str, Any] = {}
    for seed, arms in _by_seed(rows).items():
        arms = sorted(arms, key=lambda a: a["depth"])
        steps = [a["stage3_steps_to_threshold"] for a in arms]
        vals = [INF if s is None else s for s in steps]
        base = vals[0] if arms[0]["depth"] == 0 else None
        primed = [v for a, v in zip(arms, vals, strict=True) if a["depth"] >= 10]
        bars.setdefault("priming_monotone", {})[seed] = {
            "met": all(b <= a for a, b in zip(vals, vals[1:], strict=False)), "steps": steps,
            "depths": [a["depth"] for a in arms]}
        bars.setdefault("priming_half", {})[seed] = {
            "met": base is not None and base < INF and all(v <= base / 2 for v in primed),
            "d0_steps": steps[0], "primed_steps": [None if v == INF else v for v in primed]}
        bars.setdefault("priming_matched", {})[seed] = {
            "met": all(a["start_matched"] for a in arms), "stage3_starts": [a["stage3_start"] for a in arms]}
        rebound = [a["stage2_steps_to_baseline"] for a in arms]
        bars.setdefault("rebound_10_steps", {})[seed] = {
            "met": all(r is not None and r <= 10 for r in rebound), "stage2_steps": rebound}
    return bars


def judge_bars(name: str, summary: dict[str, Any]) -> dict[str, Any]:
    """``{bar: {seed: {met, ...figures}}}`` (plus the force-sign bar where forces were logged)."""
    bars: dict[str, Any] = {}
    if name == "priming":
        for direction in sorted({a.get("direction", "em") for a in summary["arms"]}):
            suffix = "" if direction == "em" else f"_{direction}"
            rows = [a for a in summary["arms"] if a.get("direction", "em") == direction]
            for key, value in _priming_bars(rows).items():
                bars[key + suffix] = value
    elif name == "diversity":
        for seed, arms in _by_seed(summary["arms"]).items():
            for rev in sorted({a["reverse"] for a in arms}):
                rate = {a["dataset"]: a["degradation_rate"] for a in arms if a["reverse"] == rev}
                order = [rate.get(k) for k in ("fixed", "standard", "styled")]
                ok = None not in order and order[0] > order[1] > order[2]
                bars.setdefault(f"diversity_{rev}", {})[seed] = {
                    "met": ok, "degradation_rate": rate,
                    "purity": {a["dataset"]: a["purity"] for a in arms if a["reverse"] == rev},
                    "rate_at_fixed_S": {a["dataset"]: a.get("degradation_rate_at") for a in arms
                                        if a["reverse"] == rev}}
    elif name == "elasticity":
        for seed, pairs in _by_seed(summary["pairs"]).items():
            bars.setdefault("inverse_below_forward", {})[seed] = {
                "met": all(p["inverse_loss"] < p["forward_loss"] for p in pairs),
                "pairs": [(p["pair"], round(p["forward_loss"], 4), round(p["inverse_loss"], 4)) for p in pairs]}
        for seed, curves in _by_seed(summary["curves"]).items():
            shape = []
            for c in curves:
                early = c["steepest_step"] is not None and c["steepest_step"] <= 0.2 * c["steps"][-1]
                bends = (c["rate_after_p0"] is not None and c["rate_before_p0"] is not None
                         and c["rate_after_p0"] < c["rate_before_p0"])
                shape.append({"checkpoint": c["checkpoint"], "fastest_first": early, "bends_near_p0": bends,
                              "steepest_step": c["steepest_step"], "steps_to_p0": c["steps_to_p0"],
                              "rate_before_p0": c["rate_before_p0"], "rate_after_p0": c["rate_after_p0"]})
            bars.setdefault("negative_curve_shape", {})[seed] = {
                "met": all(s["fastest_first"] and s["bends_near_p0"] for s in shape), "curves": shape}
    fsa = summary.get("force_sign_agreement")
    if fsa is not None:
        bars["force_sign_agreement_80"] = {"met": fsa >= 0.8, "agreement": fsa}
    return bars


def plot_protocol(name: str, summary: dict[str, Any], out: Path) -> list[Path]:
    """The protocol's figures under ``out``."""

    paths = []
    styles = {0: "-", 1: "--"}
    if name == "priming":
        figures = [(d, key, f"{stem}{'' if d == 'em' else '-' + d}.png", f"{title} ({d} direction)")
                   for d in sorted({a.get("direction", "em") for a in summary["arms"]})
                   for key, stem, title in (("stage3_curve", "priming", "stage 3 (re-exposure) per stage-1 depth"),
                                            ("stage2_curve", "rebound", "stage 2 (reverse) per stage-1 depth"))]
        for direction, key, fname, title in figures:
            with figure(out / fname) as ax:
                arms = [a for a in summary["arms"] if a.get("direction", "em") == direction]
                depths = sorted({a["depth"] for a in arms})
                for a in arms:
                    c = a[key]
                    if c["steps"]:
                        ax.plot(c["steps"], c["misaligned_rate"], styles.get(a["seed"], ":"),
                                color=f"C{depths.index(a['depth'])}", label=f"D={a['depth']} seed {a['seed']}")
                ax.set_xlabel("step")
                ax.set_ylabel("held-out misaligned rate")
                ax.set_title(title, fontsize=9)
                ax.legend(fontsize=6, ncol=2)
            paths.append(out / fname)
        pred = [f["predicted_dS"] for a in summary["arms"] for f in a["forces"]]
        meas = [f["measured_dS"] for a in summary["arms"] for f in a["forces"]]
        with figure(out / "forces.png", size=(4.5, 4)) as ax:
            ax.scatter(pred, meas, s=6)
            ax.axhline(0, color="grey", lw=0.6)
            ax.axvline(0, color="grey", lw=0.6)
            ax.set_xlabel("predicted dS (Thm 2.9, K = I)")
            ax.set_ylabel("measured dS (training prompts)")
            ax.set_xscale("symlog", linthresh=1e-9)
            ax.set_title(f"sign agreement {summary.get('force_sign_agreement')}", fontsize=9)
        paths.append(out / "forces.png")
    elif name == "diversity":
        for rev in sorted({a["reverse"] for a in summary["arms"]}):
            fname = f"diversity-{rev}.png"
            with figure(out / fname) as ax:
                names = ["fixed", "few", "standard", "styled"]
                for a in summary["arms"]:
                    if a["reverse"] == rev:
                        ax.plot(a["curve"]["steps"], a["curve"]["S"], styles.get(a["seed"], ":"),
                                color=f"C{names.index(a['dataset'])}", label=f"{a['dataset']} seed {a['seed']}")
                ax.set_xlabel("stage-2 step")
                ax.set_ylabel("S")
                ax.set_title(f"stage 2 ({rev} reverse) after each stage-1 dataset", fontsize=9)
                ax.legend(fontsize=6, ncol=2)
            paths.append(out / fname)
    elif name == "elasticity":
        with figure(out / "elasticity.png") as ax:
            ckpts = sorted({c["checkpoint"] for c in summary["curves"]})
            for c in summary["curves"]:
                ax.plot(c["steps"], c["misaligned_rate"], styles.get(c["seed"], ":"),
                        color=f"C{ckpts.index(c['checkpoint'])}", label=f"{c['checkpoint']} seed {c['seed']}")
            for seed, p0 in summary.get("p0", {}).items():
                ax.axhline(p0, color="grey", ls=styles.get(int(seed), ":"), lw=0.8)
            ax.set_xlabel("negative fine-tuning step")
            ax.set_ylabel("held-out misaligned rate (grey: p0)")
            ax.set_title("negative fine-tuning from chat checkpoints", fontsize=9)
            ax.legend(fontsize=6, ncol=2)
        paths.append(out / "elasticity.png")
    return paths
