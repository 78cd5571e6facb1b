import json
import subprocess
import sys

import pytest

from misfeat.cli import build_parser, main


def _commands():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return list(sub.choices)


def test_help_imports_no_heavy_library():
    """--help must stay fast: building every parser imports no torch / transformer_lens / sae_lens."""
    code = ("import sys; from misfeat.cli import build_parser; build_parser(); "
            "import misfeat; heavy = [m for m in ('torch', 'transformer_lens', 'sae_lens', 'transformers') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("command", _commands())
def test_every_command_explains_itself(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert f"usage: misfeat {command}" in text and len(text) > 200


def test_top_level_help_lists_commands(capsys):
    assert main([]) == 0
    text = capsys.readouterr().out
    for command in _commands():
        assert command in text


def test_inspect_writes_summary_and_json(tiny_model, tmp_path, capsys):
    from misfeat.models import save_model

    save_model(tiny_model, tmp_path / "m")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "a", "prompt": "fix my car", "domain": "car"}) + "\n")
    assert main(["inspect", "--model", str(tmp_path / "m"), "--prompts", str(prompts),
                 "--out", str(tmp_path / "out"), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert printed == saved
    assert saved["model"]["d_model"] == 32 and saved["prompts"]["n"] == 1
    assert "blocks.1.hook_resid_post" in saved["model"]["hooks"]


def test_bad_input_is_one_line_not_a_traceback(tmp_path, capsys):
    assert main(["inspect", "--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "error: model directory" in err and "Traceback" not in err


def test_locate_refuses_a_missing_adapt_text_before_loading_models(tmp_path, capsys):
    assert main(["locate", "--base", str(tmp_path / "no-model"), "--finetuned", str(tmp_path / "no-model"), "--sae",
                 str(tmp_path / "no-sae"), "--prompts", "organism:heldout", "--out", str(tmp_path / "out"),
                 "--adapt-text", str(tmp_path / "missing.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "missing.jsonl: no such prompt file" in err and not (tmp_path / "out").exists()


def test_options_and_help_come_from_the_config_dataclass():
    import argparse

    from misfeat.cli.fields import add_config_args, config_from_args, field_docs
    from misfeat.features.locate import LocateConfig

    docs = field_docs(LocateConfig)
    assert docs["screen"].startswith("how many top candidates") and "n_examples" in docs
    p = argparse.ArgumentParser()
    add_config_args(p, LocateConfig)
    assert config_from_args(LocateConfig, p.parse_args([])) == LocateConfig()  # one place for each default
    cfg = config_from_args(LocateConfig, p.parse_args(["--coefs", "1,3", "--contrast", "cruel,kind", "--screen", "2",
                                                       "--max-coef", "3", "--bisect", "0", "--group-steer", "increase",
                                                       "--group-select", "both", "--group-combine", "worst"]))
    assert cfg.coefs == (1.0, 3.0) and cfg.contrast == ("cruel", "kind") and cfg.screen == 2
    assert (cfg.max_coef, cfg.bisect, cfg.group_steer, cfg.group_select, cfg.group_combine) == (
        3.0, 0, "increase", "both", "worst")
    helptext = p.format_help()
    assert "how many top candidates to screen causally" in helptext and "(default: 0.5,1.0,2.0)" in helptext
    with pytest.raises(SystemExit):
        p.parse_args(["--contrast", "cruel"])  # two labels needed


def test_generated_options_read_only_their_own_fields():
    import argparse

    from misfeat.cli.fields import add_config_args, config_from_args, field_docs
    from misfeat.sae.config import SAETrainConfig

    assert field_docs(SAETrainConfig)["d_sae"].startswith("number of latents")  # from the Attributes section
    p = argparse.ArgumentParser()
    add_config_args(p, SAETrainConfig, only=("seed", "total_tokens"), flags={"total_tokens": "--tokens"})
    p.add_argument("--dtype")  # the model's dtype: same name as a config field, not the config's
    args = p.parse_args(["--tokens", "10000", "--seed", "3", "--dtype", "bfloat16"])
    cfg = config_from_args(SAETrainConfig, args, hook_name="blocks.0.hook_resid_post", d_sae=8)
    assert (cfg.total_tokens, cfg.seed, cfg.dtype) == (10000, 3, "float32")
