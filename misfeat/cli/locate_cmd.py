"""``misfeat locate``: SAE model diffing, attribution and causal screening in one command."""

from __future__ import annotations

import argparse

from misfeat.cli import add_device_args, add_output_args, finish
from misfeat.cli.fields import add_config_args, config_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "locate", help="find the SAE latent a fine-tune switched on that controls misalignment",
        description="The recipe of Wang et al. 2025 in one command: cache the SAE hook's activations of the base "
        "(aligned) and fine-tuned (misaligned) model on the same prompts, rank latents by their activation increase "
        "times their decoder row's share of the mean-difference direction (--rank-by: the increase alone, as Wang et "
        "al. and OpenAI, or attribution: gradient of the misalignment log-prob gap x activation change), causally "
        "screen the top "
        "--screen candidates (steer up in the base model, down in the fine-tuned model), pick the latent with the "
        "largest two-sided effect, clamp it, and save its decoder direction and top-activating examples. Then the "
        "greedy latent group (a split feature as one subspace: the smallest group, up to --group-cap, whose joint "
        "clamp to the base level cuts misalignment most), the latent families (decoder cosines, co-activation), the "
        "latents that fell (steered up in the fine-tuned model) and two baselines under the same protocol: the "
        "mean-difference direction and a random direction of equal norm. With --adapt-text TEXT the SAE is first "
        "fine-tuned on the models' activations of TEXT (stage-wise model diffing, for an SAE that lacks the feature; "
        "saved as DIR/sae). Steering strengths (--coefs) count typical "
        "residual norms at the SAE's hook, the unit of misfeat steer --op add --coefs; every steered figure is at the "
        "strongest strength that keeps the valid rate >= --min-valid (past --coefs up to --max-coef, then --bisect "
        "rounds between the strongest valid and the weakest invalid one). Several fine-tunes "
        "(--finetuned A,B,C) are ranked together (mean activation increase), each one's own top --screen-each "
        "latents join the candidates, and they are screened with rates averaged; give them prompts none of them "
        "was trained on (organism:heldout-from=health,money,law for the organism's three), else a fine-tune's "
        "narrow, in-domain learning counts in its figures (locate warns where a model's plug-in tells). "
        "Writes DIR/summary.json (top_latents, feature, direction, screen, clamp, single, group, families, "
        "decreases_screen, baselines, warnings: e.g. that no latent passed the screen while the mean-difference "
        "direction does, a sign that the SAE lacks the feature, or that the prompts hold a fine-tune's own domain), "
        "DIR/ranking.png, DIR/screen.png, DIR/families.png, DIR/examples.jsonl and "
        "examples.txt, DIR/direction.safetensors (+ .json), DIR/group.safetensors (+ .json: the group's subspace "
        "clamp, for misfeat steer/eval).",
    )
    p.add_argument("--base", required=True, metavar="SPEC", help="the aligned model, e.g. organism:chat")
    p.add_argument("--finetuned", required=True, metavar="SPEC[,SPEC...]",
                   help="the misaligned model, e.g. organism:em, or several ranked together, e.g. "
                   "organism:em,organism:em-ref/money,organism:em-ref/law")
    p.add_argument("--sae", required=True, metavar="DIR", help="an SAE (SAELens format) at a hook of both models")
    p.add_argument("--prompts", required=True, metavar="SPEC",
                   help="evaluation prompts with reference answers, e.g. organism:heldout or a JSONL file; with "
                   "several fine-tunes, prompts none of them was trained on, e.g. "
                   "organism:heldout-from=health,money,law")
    from misfeat.data import POSITIONS
    from misfeat.features.groups import GROUP_COMBINE, GROUP_SELECT, GROUP_STEER
    from misfeat.features.locate import ADAPT_WITH, CLAMP_POSITIONS, RANKINGS, LocateConfig

    add_config_args(p, LocateConfig, choices={"rank_by": RANKINGS, "adapt_with": ADAPT_WITH, "group_steer": GROUP_STEER,
                                              "group_select": GROUP_SELECT, "group_combine": GROUP_COMBINE,
                                              "clamp_positions": CLAMP_POSITIONS,
                                              "positions": [x for x in POSITIONS if x != "response"]})
    p.add_argument("--force", action="store_true", help="use an SAE trained on another model's architecture "
                   "(a warning instead of the error)")
    add_device_args(p)
    add_output_args(p, out_required=True)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from misfeat.errors import MisfeatError
    from misfeat.features.locate import LocateConfig, locate, save_locate
    from misfeat.io import format_table
    from misfeat.models import load_model
    from misfeat.sae.io import load_sae
    from misfeat.specs import split_specs
    from misfeat.validate import check_sae_model

    cfg = config_from_args(LocateConfig, args)
    if cfg.adapt_text:  # a missing or malformed text is reported before any model is loaded
        from misfeat.data import load_prompts

        load_prompts(cfg.adapt_text)
    specs = split_specs(args.finetuned)
    sae = load_sae(args.sae)
    base = load_model(args.base, device=args.device, dtype=args.dtype)
    finetuned = [load_model(s, device=args.device, dtype=args.dtype) for s in specs]
    for spec, model in zip(specs, finetuned, strict=True):
        if base.cfg.d_model != model.cfg.d_model:
            raise MisfeatError(f"--base and --finetuned {spec} differ in d_model ({base.cfg.d_model} vs "
                               f"{model.cfg.d_model}); diffing needs checkpoints of one architecture")
    check_sae_model(sae, base, force=args.force, where=f"--base {args.base}")
    result = save_locate(locate(base, finetuned if len(finetuned) > 1 else finetuned[0], sae, args.prompts, args.out,
                                cfg), args.out)
    s = result.to_dict()
    cols = ["latent", "increase", "base_mean", "finetuned_mean", "attribution", "steer_up_misaligned",
            "steer_up_valid", "steer_down_misaligned", "steer_down_valid"]
    a = s.get("adapted")
    if a:
        cols.append("decoder_cosine_to_original")
    table = format_table(s["top_latents"][: max(args.screen, 10)], cols)
    if a:
        table += (f"\n\nSAE adapted to the fine-tune first (stage-wise model diffing) on {a['text']} with "
                  f"{', '.join(a['models'])}: {a['steps']} steps, {a['tokens']} rows, {a['seconds']:.0f} s; saved to "
                  f"{a['sae']}; the feature's decoder row turned to cosine {a['feature_decoder_cosine']:.2f} of its "
                  f"original (median latent {a['decoder_cosine_median']:.2f})")
    clamp = s["clamp"]
    table += (f"\n\nfeature: latent {s['feature']} (passed the screen: {s['feature_passed_screen']}); direction "
              f"saved to {s['direction']}\nclamped in the fine-tuned model to the base level along its direction (every "
              f"layer{'' if s['config']['clamp_positions'] == 'all' else ', answer position only'}): {clamp['group']} misaligned {clamp['misaligned_before']:.3f} -> "
              f"{clamp['misaligned_after']:.3f} (valid {clamp['valid_after']:.3f}); as an SAE latent with the error "
              f"term kept: {s['clamp_latent']['misaligned_after']:.3f}")
    table += "\n" + protocol_line(f"latent {s['feature']}", s["single"])
    if s.get("group") and s["group"]["latents"]:
        pursued = s["group"].get("pursued")
        table += "\n" + protocol_line(f"group {s['group']['latents']}" + (f" ({pursued} by matching pursuit, not "
                                       "screened)" if pursued else ""), s["group"])
    for name, b in (s.get("baselines") or {}).items():
        table += "\n" + protocol_line(f"baseline {name}", b)
        if b.get("decoder_cosine_max") is not None:
            table += (f"; nearest SAE decoder row: latent {b['decoder_cosine_max_latent']} at cosine "
                      f"{b['decoder_cosine_max']:.2f} (the feature's: {b['decoder_cosine_feature']:.2f})")
    if s["feature_auroc_docs"] is not None:
        table += f"\nAUROC of the labelled texts (positive vs negative): {s['feature_auroc_docs']:.3f}"
    elif s.get("feature_auroc_note"):
        table += f"\nAUROC {s['feature_auroc_note']}"
    table += "".join(f"\nWARNING: {w}" for w in s["warnings"])
    finish(args, {"base": args.base, "finetuned": args.finetuned, "sae": args.sae, "prompts": args.prompts, **s},
           table)
    return 0


def protocol_line(name: str, figure: dict) -> str:
    """One protocol figure of summary.json (single, group, a baseline) as a line: steered up in the base model,
    clamped in the misaligned model(s), with the 95% bootstrap intervals over the prompts in brackets."""

    def ci(x: list[float] | None, pct: bool = False) -> str:
        return "" if not x else f" [{100 * x[0]:.0f}, {100 * x[1]:.0f}]" if pct else f" [{x[0]:.2f}, {x[1]:.2f}]"

    line = (f"{name}: steered up in the base model misaligned {figure['steer_up_misaligned']:.3f}"
            f"{ci(figure.get('steer_up_ci95'))} (valid {figure['steer_up_valid']:.3f}); clamp "
            f"{figure['clamp_before']:.3f} -> {figure['clamp_after']:.3f}, cut {100 * figure['clamp_cut']:.0f}%"
            f"{ci(figure.get('clamp_cut_ci95'), True)}")
    each = figure.get("per_finetuned") or []
    if len(each) > 1:
        line += "; per fine-tune " + ", ".join(f"{100 * m['clamp_cut']:.0f}%{ci(m.get('clamp_cut_ci95'), True)}"
                                               for m in each if m.get("clamp_cut") is not None)
    return line

