"""scripts/sae_grid.py's verdicts: a row passes only where the steering and every fine-tune's cut pass."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "sae_grid.py"


def load_script():
    spec = importlib.util.spec_from_file_location("sae_grid", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row(sae: str, single_cuts=None, group_cuts=None, single_cut=0.9, group_cut=0.9, up=0.5, valid=0.85) -> dict:
    return {"seed": 0, "corpus": "pretrain", "sae": sae, "ev": 0.95, "locate_s": 1.0, "feature": 7, "passed": True,
            "single_up": up, "single_valid": valid, "single_cut": single_cut, "group": [7, 9], "group_up": up,
            "group_valid": valid, "group_cut": group_cut, "single_clamp_valid": 0.8, "group_clamp_valid": 0.8,
            "md_up": 0.9, "md_valid": 0.8, "md_cut": 1.0, "rand_up": 0.0, "rand_valid": 0.8, "rand_cut": 0.04,
            "single_cuts": single_cuts, "group_cuts": group_cuts}


def test_a_row_passes_only_where_every_fine_tune_is_cut(tmp_path):
    rows = [row("runs/sae-256-k8"),  # one fine-tune: 90% and 0.5 at valid 0.85 pass
            row("runs/sae-512-k8", [0.94, 0.78, 0.75], [0.96, 0.83, 0.798]),  # mean cuts >= 80%, law < 80%
            row("runs/sae-1024-k8", [0.99, 0.85, 0.82], [0.99, 0.88, 0.84]),
            row("runs/sae-2048-k8", valid=0.79)]  # steering that breaks the model does not pass
    path = tmp_path / "grid-x.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = load_script().table(path).splitlines()[2:]
    verdicts = [[cell.split("**")[1] for cell in line.split("|")[5:7]] for line in lines]
    assert verdicts == [["pass", "pass"], ["fail", "fail"], ["pass", "pass"], ["fail", "fail"]]
    assert "96.0% / 83.0% / 79.8%" in lines[1]  # the cut of each fine-tune, not of the mean, unrounded to the bar


def test_the_baselines_get_the_same_verdict_on_each_fine_tune(tmp_path):
    """The mean-diff and random baselines are judged as the SAE is: each fine-tune's cut, hand-computed from
    a summary.json the row lacks (rows of older runs), read from the run directory SAE/locate-TAG."""
    sae = tmp_path / "sae-256-k8"
    (sae / "locate-x").mkdir(parents=True)
    base = {"steer_up_misaligned": 0.9, "steer_up_valid": 0.85}
    summary = {"single": {"clamp_valid_after": 0.8}, "group": {"clamp_valid_after": 0.8}, "baselines": {
        "mean_diff": {**base, "per_finetuned": [{"clamp_before": 0.8, "clamp_after": 0.04},      # 95.0%
                                                {"clamp_before": 0.5, "clamp_after": 0.101}]},   # 79.8%
        "random": {**base, "per_finetuned": [{"clamp_before": 0.8, "clamp_after": 0.8},
                                             {"clamp_before": 0.5, "clamp_after": 0.49}]}}}
    (sae / "locate-x" / "summary.json").write_text(json.dumps(summary))
    old = row(str(sae), [0.9, 0.9], [0.9, 0.9])  # written before md_cuts were kept
    new = {**row(str(sae).replace("256", "512"), [0.9, 0.9], [0.9, 0.9]), "md_cuts": [0.9, 0.85],
           "rand_cuts": [0.0, 0.01]}
    path = tmp_path / "grid-x.jsonl"
    path.write_text(json.dumps(old) + "\n" + json.dumps(new) + "\n")
    lines = load_script().table(path).splitlines()[2:]
    (md_old, rand_old), (md_new, rand_new) = (line.split("|")[7:9] for line in lines)
    assert "95.0% / 79.8% **fail**" in md_old and "0.0% / 2.0% **fail**" in rand_old
    assert "90.0% / 85.0% **pass**" in md_new and "0.0% / 1.0% **fail**" in rand_new
