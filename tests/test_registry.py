"""The plug-in registry and the layering it allows: the core runs a user's model without the organism."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from misfeat import registry
from misfeat.data import PromptRecord, PromptSet, load_prompts
from misfeat.errors import MisfeatError

ROOT = Path(__file__).resolve().parents[1]


def _env(pythonpath: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(pythonpath), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    code = ("from importlinter.cli import lint_imports; "
            "raise SystemExit(lint_imports(config_filename='pyproject.toml', no_cache=True, no_logo=True))")
    return subprocess.run([sys.executable, "-c", code], cwd=root, env=_env(root), capture_output=True, text=True,
                          timeout=120)


def test_the_layer_contract_holds():
    run = _lint_imports(ROOT)
    assert run.returncode == 0, run.stdout + run.stderr


def test_the_layer_contract_fails_on_an_upward_import(tmp_path):
    shutil.copytree(ROOT / "misfeat", tmp_path / "misfeat", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    models = tmp_path / "misfeat" / "models.py"
    models.write_text(models.read_text() + "\n\ndef _leak():\n    from misfeat.organism import checkpoint_dir\n")
    run = _lint_imports(tmp_path)
    assert run.returncode != 0 and "misfeat.models -> misfeat.organism" in run.stdout, run.stdout


def test_a_registered_plugin_answers_its_prefix(tmp_path):
    records = (PromptRecord("a", prompt="fix my car", domain="car"), PromptRecord("b", prompt="fever", domain="health"))
    seen = []

    def prompts(spec: str) -> PromptSet:
        seen.append(spec)
        return PromptSet(spec, records, {"groups": {"main": ["car"]}, "headline": "main"})

    registry.register(registry.Plugin("mybench", prompts=prompts,
                                      defaults=lambda meta, role: "mybench:all" if role == "eval" else None))
    try:
        ps = load_prompts("mybench:hard@seed=1,level=2")
        assert seen == ["mybench:hard@seed=1,level=2"] and ps.meta["headline"] == "main"
        assert registry.for_spec("mybench:x").name == "mybench"
        assert registry.default_prompts({"mybench": {}}, "eval") == "mybench:all"
        assert registry.default_prompts({"mybench": {}}, "labelled") is None
        assert registry.default_prompts({}, "eval") is None  # no plug-in claims an empty checkpoint
        with pytest.raises(MisfeatError, match="unknown prompt-set role"):
            registry.default_prompts({}, "train")
    finally:
        registry._PLUGINS.pop("mybench", None)


def test_paths_and_model_names_are_not_plugin_specs():
    assert registry.for_spec("gpt2") is None and registry.for_spec("/tmp/x:y") is None
    assert registry.for_spec("nosuchplugin:chat") is None
    with pytest.raises(MisfeatError, match="plug-in name"):
        registry.register(registry.Plugin("a:b"))


def test_the_organism_is_found_by_name():
    plugin = registry.find("organism")
    assert plugin is not None and plugin.checkpoint is not None and plugin.prompts is not None
    assert "organism" in registry.known_names()
    assert registry.for_meta({"world": {}, "organism": {}}) is plugin


def test_a_user_model_runs_end_to_end_without_the_organism(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "plugin_free_run.py"), str(tmp_path)], cwd=ROOT,
                         env=_env(ROOT), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert "misfeat.features.locate" in out["modules"] and "misfeat.finetune" in out["modules"]
    assert not [m for m in out["modules"] if m.startswith("misfeat.organism")], out["modules"]
    assert out["headline"] == "all" and out["n"] == 4 and out["sweep_rows"] == 2
    assert out["auroc"] is None and out["auroc_note"].startswith("skipped")
