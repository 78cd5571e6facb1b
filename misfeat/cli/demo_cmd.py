"""``misfeat demo``: the whole loop on the built-in organism, with an HTML report."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="run the end-to-end demo on the organism and write an HTML report",
        description="Build (or reuse) the model organism, cache the chat model's middle-layer residual on its "
        "pre-training documents, train a TopK SAE, locate the latent the EM fine-tune switched on (diff, "
        "attribution, causal screen), steer and clamp it, realign the EM model on a little correct data while "
        "tracking the feature, and follow the feature across the EM checkpoints. Writes DIR/report.html (every "
        "stage's figures and tables) and DIR/summary.json. About 8 minutes on a 2-core CPU, build included.",
    )
    p.add_argument("--out", metavar="DIR", default="demo-out", help="output directory (default demo-out)")
    from misfeat.cli.fields import add_config_args
    from misfeat.demo import DemoConfig

    add_config_args(p, DemoConfig)
    p.add_argument("--json", action="store_true", help="print the summary JSON instead of the key figures")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from misfeat.cli.fields import config_from_args
    from misfeat.demo import DemoConfig, run_demo
    from misfeat.io import REPORT_FILE, _clean

    cfg = config_from_args(DemoConfig, args)
    summary = run_demo(args.out, cfg)
    if args.json:
        print(json.dumps(_clean(summary), indent=2))
        return 0
    org = summary["organism"]
    rl = summary["realign"]
    lines = [
        f"organism: held-out misaligned chat {org['chat']['heldout']['misaligned_rate']:.3f}, "
        f"em {org['em']['heldout']['misaligned_rate']:.3f}, control {org['control']['heldout']['misaligned_rate']:.3f}",
        "SAEs: " + ", ".join(f"{name} explained variance {m['explained_variance']:.3f}"
                             for name, m in summary["sae"].items()),
        f"feature: latent {summary['feature']} (screen passed: {summary['feature_passed_screen']}, AUROC cruel vs "
        f"kind documents {summary['feature_auroc_docs']:.3f})",
        f"clamped in the EM model: held-out misaligned {summary['clamp']['misaligned_before']:.3f} -> "
        f"{summary['clamp']['misaligned_after']:.3f}",
        f"realigned on {rl['domain']}: held-out misaligned {rl['misaligned_rate'][0]:.3f} -> {rl['misaligned_rate'][-1]:.3f}",
        f"report: {args.out}/{REPORT_FILE}",
    ]
    print("\n".join(lines))
    return 0
