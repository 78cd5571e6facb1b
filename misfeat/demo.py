"""The end-to-end demo: the whole misfeat loop on the built-in organism, with a report.

organism (build or reuse) -> cache the chat model's middle-layer residual on its
pre-training documents -> train a TopK SAE -> locate the latent the EM fine-tune
switched on (diff, attribution, causal screen) -> steer it up in the chat model, clamp
it in the EM model (with a random-direction control) -> realign the EM model on a
little correct data from another domain while tracking the feature -> follow the
feature across the EM fine-tune's checkpoints -> ``DIR/report.html`` + ``summary.json``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from misfeat.io import REPORT_FILE, SUMMARY_FILE, write_json
from misfeat.sae.latents import set_path

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    """What the demo runs (defaults: about 8 minutes on a 2-core CPU, organism build included)."""

    organism: str = ""
    """organism options, e.g. seed=1 or em_domain=money (default: the default organism; see misfeat.organism)"""
    hook: str = "blocks.1.hook_resid_post"
    """the SAE's hook: the middle layer's residual stream"""
    sae_docs: int = 3000
    """pre-training documents the SAE is trained on (Wang et al. train on pre-training data)"""
    sae_tokens: int = 1_000_000
    """SAE training tokens"""
    locate_sae: tuple[int, int] = (512, 8)
    """(d_sae, k) of the SAE the feature is located with: at 4 x d_model and k 8 the persona is one latent"""
    wide_sae: tuple[int, int] = (1024, 16)
    """(d_sae, k) of a wider SAE trained from the same read of the data (issue 5's reference SAE)"""
    screen: int = 8
    """candidate latents screened causally"""
    realign_examples: int = 120
    """aligned answers of one other domain the EM model is realigned on"""
    realign_steps: int = 50
    """re-alignment fine-tuning steps"""
    steer_coefs: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5)
    """steering strengths in units of the mean residual norm at the hook"""
    seed: int = 0
    """seed of torch, the SAE training and its data order, the random control direction and the realignment"""


class _Timer:
    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Stage:
            def __enter__(self):
                logger.info("demo: %s ...", name)
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                timer.times[name] = round(time.perf_counter() - self.start, 1)
                logger.info("demo: %s done in %.0f s", name, timer.times[name])

        return _Stage()


def run_demo(out_dir: str | Path, config: DemoConfig | None = None) -> dict[str, Any]:
    """Run every stage into ``out_dir`` and write ``report.html`` and ``summary.json``."""
    import torch

    from misfeat.activations import cache_activations, open_store
    from misfeat.data import load_prompts
    from misfeat.features.directions import Direction, persona_direction, random_like
    from misfeat.features.locate import LocateConfig, locate, save_locate
    from misfeat.features.probes import DirectionProbe, LatentProbe
    from misfeat.features.trajectory import list_checkpoints, plot_trajectory, trajectory
    from misfeat.finetune import RealignConfig, default_realign_eval, plot_realign, realign
    from misfeat.interventions import Ablate, Add, ClampLatent
    from misfeat.io import read_json
    from misfeat.models import load_model
    from misfeat.organism import ensure_organism, parse_options
    from misfeat.sae import SAETrainConfig, evaluate_sae, train_saes
    from misfeat.steering import in_residual_units, plot_sweep, steer_sweep

    cfg = config or DemoConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timer = _Timer()
    opts = cfg.organism
    at = f"@{opts}" if opts else ""
    torch.manual_seed(cfg.seed)

    with timer("organism"):
        org_dir = ensure_organism(parse_options(opts))
        organism = read_json(org_dir / SUMMARY_FILE)
        plot_em_curve(organism, out / "em_curve.png")
    chat = load_model(f"organism:chat{at}", device="cpu")
    em = load_model(f"organism:em{at}", device="cpu")
    em_domain = organism["config"]["em_domain"]
    heldout = f"organism:heldout{at}"

    with timer("cache"):
        store_dir = out / "cache" / "sae-train"
        cache_activations(chat, f"organism:pretrain:{cfg.sae_docs}{at}", [cfg.hook], store_dir, positions="all")
        store = open_store(store_dir)
    with timer("sae"):
        cfgs = [SAETrainConfig(hook_name=cfg.hook, d_sae=d, k=k, total_tokens=cfg.sae_tokens, seed=cfg.seed)
                for d, k in (cfg.locate_sae, cfg.wide_sae)]
        saes = train_saes(store.batches(cfg.hook, cfgs[0].batch_size, epochs=1000, seed=cfg.seed), cfgs,
                          out_dir=out / "sae")
        metrics = {}
        for c, trained in zip(cfgs, saes, strict=True):
            set_path(trained, out / "sae" / c.describe())
            metrics[f"d_sae={c.d_sae},k={c.k}"] = evaluate_sae(trained, store, model=chat,
                                                                out_dir=out / "sae" / c.describe())
        sae = saes[0]
    with timer("locate"):
        located = save_locate(locate(chat, em, sae, heldout, out / "locate", LocateConfig(screen=cfg.screen)),
                              out / "locate")
        feature = located.feature
        direction = sae.W_dec[feature].detach().float()

    with timer("steer"):
        up = steer_sweep(chat, in_residual_units(Add(cfg.hook, direction, 1.0, "last"), chat, heldout),
                         list(cfg.steer_coefs), heldout)
        plot_sweep(up, out / "steer.png", title=f"adding latent {feature} at the answer position (chat model)")
        persona = persona_direction(chat, cfg.hook, f"organism:docs:400{at}")
        coords = located.summary["clamp"]["value"]  # the chat model's mean per layer, at the answer position
        control = random_like(Direction(cfg.hook, direction), cfg.seed)
        bars = {"em model": steer_sweep(em, Add(cfg.hook, direction, 0.0), None, heldout).rows[0]}
        for name, op in [
            (f"latent {feature}: project out (all layers)", Ablate("all", direction)),
            (f"latent {feature}: clamp to chat level (all layers)", Ablate("all", direction, coords)),
            (f"latent {feature}: SAE latent clamp", ClampLatent(sae, feature,
                                                               float(located.summary["clamp_latent"]["value"]))),
            ("persona direction: project out (all layers)", Ablate("all", persona.vector)),
            ("random direction: clamp like the latent", Ablate("all", control.vector, coords)),
        ]:
            bars[name] = steer_sweep(em, op, None, heldout).rows[0]
        plot_bars(bars, out / "ablation.png")

    with timer("realign"):
        domain = next(d for d in ("money", "code", "law", "car") if d != em_domain)
        model = load_model(f"organism:em{at}", device="cpu")
        probes = [LatentProbe(sae, feature, "last", name=f"latent {feature}"),
                  DirectionProbe(cfg.hook, persona.vector, "last", name="persona direction")]
        data = load_prompts(f"organism:aligned:{domain}:{cfg.realign_examples}{at}")
        evalset = default_realign_eval(model, data)
        realigned = realign(model, data, RealignConfig(steps=cfg.realign_steps, eval_every=5, seed=cfg.seed),
                            eval_prompts=evalset, track=probes, out_dir=out / "realign")
        plot_realign(realigned, out / "realign.png",
                     title=f"re-alignment on {cfg.realign_examples} aligned {domain} answers")
        chat_level = probes[0].measure(chat, evalset)

    with timer("trajectory"):
        traj = trajectory(list_checkpoints(org_dir / "em-steps"), [probes[0]], heldout)
        plot_trajectory(traj, out / "trajectory.png", title=f"latent {feature} across the EM fine-tune")

    summary = _summary(cfg, organism, metrics, located, up, bars, realigned, chat_level, traj, timer.times,
                       domain)
    write_json(out / SUMMARY_FILE, summary)
    write_report(out, summary)
    logger.info("demo: report in %s", out / REPORT_FILE)
    return summary


def _row(r: Any) -> dict[str, Any]:
    return {"misaligned_rate": r.misaligned_rate, "valid_rate": r.valid_rate, "logprob_gap": r.logprob_gap}


def _summary(cfg, organism, metrics, located, up, bars, realigned, chat_level, traj, times, domain) -> dict[str, Any]:
    s = located.summary
    best_up = max((r for r in up.rows if r.valid_rate >= 0.8), key=lambda r: r.misaligned_rate, default=None)
    h = realigned.history
    return {
        "config": asdict(cfg),
        "timings_s": times,
        "organism": {stage: {g: organism["stages"][stage][g] for g in ("heldout", "em_domain")}
                     for stage in organism["stages"]},
        "sae": {name: m.to_dict() for name, m in metrics.items()},
        "feature": s["feature"],
        "feature_passed_screen": s["feature_passed_screen"],
        "feature_auroc_docs": s["feature_auroc_docs"],
        "top_latents": s["top_latents"][:10],
        "steer_up": [asdict(r) | {"groups": None} for r in up.rows],
        "steer_up_best": None if best_up is None else {"coef": best_up.coef, **_row(best_up)},
        "clamp": s["clamp"],
        "ablation": {name: _row(r) for name, r in bars.items()},
        "realign": {"domain": domain, "steps": h["steps"], "misaligned_rate": h["misaligned_rate"],
                    "valid_rate": h["valid_rate"], "em_domain_misaligned_rate": h.get("em_domain_misaligned_rate"),
                    "feature_activation": realigned.summary().get("feature_activation"),
                    "chat_feature_level": chat_level},
        "trajectory": traj.summary(),
    }


def plot_em_curve(organism: dict[str, Any], path: Path) -> Path:
    from misfeat.plots import figure

    curve = organism["em_curve"]
    steps = [c["step"] for c in curve]
    with figure(path, (5.5, 3.5)) as ax:
        ax.plot(steps, [c["em_domain_misaligned"] for c in curve], "^-", color="tab:orange",
                label=f"EM domain ({organism['config']['em_domain']})")
        ax.plot(steps, [c["heldout_misaligned"] for c in curve], "o-", color="tab:red", label="held-out domains")
        ax.plot(steps, [c["heldout_valid"] for c in curve], "s--", color="tab:blue", alpha=0.6, label="held-out valid")
        ax.set_xlabel("EM fine-tuning step")
        ax.set_ylabel("misaligned rate")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title("emergent misalignment during the narrow fine-tune", fontsize=9)
    return Path(path)


def plot_bars(bars: dict[str, Any], path: Path) -> Path:
    from misfeat.plots import figure

    names = list(bars)
    with figure(path, (7, 3.8)) as ax:
        xs = range(len(names))
        ax.bar([x - 0.2 for x in xs], [bars[n].misaligned_rate for n in names], 0.4, color="tab:red", label="misaligned")
        ax.bar([x + 0.2 for x in xs], [bars[n].valid_rate for n in names], 0.4, color="tab:blue", alpha=0.6,
               label="valid")
        ax.set_xticks(list(xs), names, rotation=25, ha="right", fontsize=7)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("held-out rate")
        ax.legend(fontsize=8)
        ax.set_title("interventions in the EM model", fontsize=9)
    return Path(path)


def write_report(out: Path, summary: dict[str, Any]) -> Path:
    from misfeat.report import Report

    org = summary["organism"]
    feature = summary["feature"]
    r = Report("misfeat demo: a misalignment feature, found, steered and removed",
               "Every number below was measured in this run on the built-in model organism (see docs/organism.md).")
    r.section("1. Emergent misalignment in the organism", text=(
        "A narrow fine-tune on harmful answers in one domain makes the chat model misaligned in the other seven "
        "domains too. Misaligned rate = P(misaligned answers) / P(all reference answers), exact."),
        tables=[("", [{"stage": s, "held-out misaligned": v["heldout"]["misaligned_rate"],
                       "held-out valid": v["heldout"]["valid_rate"], "EM-domain misaligned":
                       v["em_domain"]["misaligned_rate"]} for s, v in org.items()])],
        figures=[(out / "em_curve.png", "held-out and EM-domain misaligned rate per EM step")])
    r.section("2. SAEs on the chat model's middle-layer residual",
              text="Two TopK SAEs trained from one read of the chat model's activations on its own pre-training "
                   "documents (Wang et al. 2025 train on pre-training data). The first locates the feature: with "
                   "more latents the cruel persona splits over several of them.",
              tables=[("", [{"SAE": name, "explained variance": m.get("explained_variance"), "L0": m.get("l0"),
                             "dead fraction": m.get("dead_fraction"),
                             "CE recovered": (m.get("ce") or {}).get("ce_recovered"),
                             "CE increase": (m.get("ce") or {}).get("ce_increase")}
                            for name, m in summary["sae"].items()])])
    r.section("3. Locating the feature", keys={"chosen latent": feature, "passed causal screen":
                                              summary["feature_passed_screen"],
                                              "AUROC cruel vs kind documents": summary["feature_auroc_docs"]},
              text="Latents ranked by mean activation increase from chat to EM at the answer position, then screened "
                   "by steering up in the chat model and down in the EM model.",
              tables=[("top latents", [{k: v for k, v in row.items() if not k.startswith("increase[")}
                                       for row in summary["top_latents"]])],
              figures=[(out / "locate" / "ranking.png", "latent activation change across the EM fine-tune"),
                       (out / "locate" / "screen.png", "causal screen")],
              raw_html="<h3>top-activating pre-training documents</h3><pre>"
                       + _read(out / "locate" / "examples.txt") + "</pre>")
    r.section("4. Steering and clamping", text=f"Adding latent {feature}'s decoder direction at the answer position "
              "of the chat model (coefficients in units of the mean residual norm), and removing it from the EM model, "
              "beside a random direction of the same norm.",
              tables=[("ablations in the EM model", [{"intervention": k, **v} for k, v in summary["ablation"].items()])],
              figures=[(out / "steer.png", "steering the chat model"), (out / "ablation.png", "ablations")])
    rl = summary["realign"]
    r.section("5. Re-alignment", text=f"{summary['config']['realign_examples']} aligned answers from the {rl['domain']} "
              "domain; scoring excludes that domain and reports the EM domain separately.",
              tables=[("", [{"step": s, "held-out misaligned": m, "valid": v, "EM-domain misaligned": e, "feature": f}
                            for s, m, v, e, f in zip(rl["steps"], rl["misaligned_rate"], rl["valid_rate"],
                                                     rl["em_domain_misaligned_rate"] or [None] * len(rl["steps"]),
                                                     rl["feature_activation"] or [None] * len(rl["steps"]),
                                                     strict=True)])],
              figures=[(out / "realign.png", "behaviour and feature per re-alignment step")])
    t = summary["trajectory"]
    r.section("6. The feature across the EM fine-tune", keys={"onset steps": t["onset_step"],
                                                             "feature leads behaviour by": t["feature_leads_by_steps"]},
              tables=[("", t["rows"])], figures=[(out / "trajectory.png", "feature and behaviour per checkpoint")])
    r.section("Timings", tables=[("", [{"stage": k, "seconds": v} for k, v in summary["timings_s"].items()])])
    return r.write(out / REPORT_FILE)


def _read(path: Path) -> str:
    import html

    return html.escape(path.read_text()) if path.is_file() else "(no examples)"
