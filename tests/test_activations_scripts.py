"""scripts/extract_across_checkpoints.py on a tiny directory of checkpoints."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from misfeat.activations import open_store
from misfeat.models import save_model
from tests.conftest import build_tiny_model
from tests.test_activations import write_prompts

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "extract_across_checkpoints.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("extract_across_checkpoints", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pytestmark = pytest.mark.usefixtures("one_thread")


def test_extract_across_checkpoints_tabulates_each_checkpoint(script, word_tokenizer, tmp_path, capsys):
    steps = tmp_path / "em-steps"
    for i, seed in enumerate((0, 1, 2)):
        save_model(build_tiny_model(word_tokenizer, seed=seed), steps / f"step-{2 * i:04d}")
    (steps / "not-a-model").mkdir()
    direction = torch.randn(32)
    torch.save(direction, tmp_path / "dir.pt")
    prompts = write_prompts(tmp_path / "p.jsonl", 20)
    argv = ["--checkpoints", str(steps), "--prompts", str(prompts), "--hook", "blocks.1.hook_resid_post",
            "--positions", "response", "--direction", str(tmp_path / "dir.pt"), "--out", str(tmp_path / "out")]
    assert script.main(argv) == 0
    table = capsys.readouterr().out
    assert "step-0000" in table and "step-0004" in table and "mean_projection" in table
    rows = [json.loads(line) for line in (tmp_path / "out" / "checkpoint_stats.jsonl").read_text().splitlines()]
    assert [r["checkpoint"] for r in rows] == ["step-0000", "step-0002", "step-0004"]
    unit = direction.double() / direction.double().norm()
    for r in rows:
        acts = open_store(tmp_path / "out" / r["checkpoint"]).rows("blocks.1.hook_resid_post", slice(None)).double()
        assert r["rows"] == len(acts)
        assert r["mean_norm"] == pytest.approx(float(acts.norm(dim=1).mean()), rel=1e-9)
        assert r["mean_projection"] == pytest.approx(float((acts @ unit).mean()), rel=1e-9, abs=1e-12)
    assert rows[0]["mean_shift_from_first"] == 0 and rows[1]["mean_shift_from_first"] > 0
    assert len({r["fingerprint"] for r in rows}) == 3
    assert script.main([*argv[:-1], str(tmp_path / "out")]) == 0  # re-run: resumes, same table
    assert [json.loads(x) for x in (tmp_path / "out" / "checkpoint_stats.jsonl").read_text().splitlines()] == rows
    assert script.main(["--checkpoints", str(tmp_path / "none"), *argv[2:]]) == 2
    assert "does not exist" in capsys.readouterr().err
