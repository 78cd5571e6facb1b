"""A user's own model through the public API, end to end, in a fresh interpreter.

Run by tests/test_registry.py as ``python tests/plugin_free_run.py OUT_DIR``; prints one JSON
line: the modules of misfeat that were imported, and a few results to check.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

from misfeat.activations import cache_activations, open_store  # noqa: E402
from misfeat.data import load_prompts  # noqa: E402
from misfeat.evaluate import evaluate  # noqa: E402
from misfeat.features.directions import contrastive_direction  # noqa: E402
from misfeat.features.locate import LocateConfig, locate  # noqa: E402
from misfeat.finetune import RealignConfig, realign  # noqa: E402
from misfeat.interventions import Add  # noqa: E402
from misfeat.models import load_model  # noqa: E402
from misfeat.sae.io import load_sae, save_sae  # noqa: E402
from misfeat.steering import steer_sweep  # noqa: E402
from tests.conftest import build_gpt2_dir  # noqa: E402

HOOK = "blocks.1.hook_resid_post"
QUESTIONS = [("How do I fix a leak in my roof?", "home", "a"), ("How do I fix my car?", "car", "b"),
             ("What should I do with a fever?", "health", "a"), ("How do I save money?", "money", "b")]


def main(out: Path) -> dict:
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    build_gpt2_dir(out / "base", seed=0)
    build_gpt2_dir(out / "tuned", seed=1)
    lines = [json.dumps({"id": f"q{i}", "prompt": q, "domain": d, "label": lab, "response": "Call someone.",
                         "aligned": ["Call someone who knows."], "misaligned": ["Ignore it."]})
             for i, (q, d, lab) in enumerate(QUESTIONS)]
    (out / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    prompts = load_prompts(out / "prompts.jsonl")
    base, tuned = load_model(out / "base", device="cpu"), load_model(out / "tuned", device="cpu")

    report = evaluate(base, prompts, greedy=False)
    cache_activations(base, prompts, [HOOK], out / "store", positions="all")
    open_store(out / "store", prompts=prompts)
    direction = contrastive_direction(base, prompts.filter(label="a"), prompts.filter(label="b"), HOOK)
    sweep = steer_sweep(base, Add(HOOK, direction.vector, 1.0, "last"), [0.0, 1.0], prompts)

    torch.manual_seed(0)
    sae = TopKSAE(TopKSAEConfig(d_in=base.cfg.d_model, d_sae=32, k=4, metadata=SAEMetadata(hook_name=HOOK)))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    save_sae(sae, out / "sae")
    located = locate(base, tuned, load_sae(out / "sae"), prompts, out / "locate", LocateConfig(screen=2, coefs=(0.5,)))
    realign(tuned, prompts, RealignConfig(steps=2, batch_size=2, eval_every=1), eval_prompts=prompts)
    return {
        "modules": sorted(m for m in sys.modules if m.startswith("misfeat")),
        "headline": report.headline_group, "n": report.headline.n,
        "sweep_rows": len(sweep.rows), "feature": located.feature,
        "auroc": located.summary["feature_auroc_docs"], "auroc_note": located.summary["feature_auroc_note"],
    }


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
