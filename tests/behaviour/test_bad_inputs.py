"""Bad input never costs work or gives a silent wrong answer (issue #19).

Every case runs the command line in-process on tiny models built in code and asserts three
things: the exit code, the one-line message (and no traceback), and that every file that
existed before the failed command is byte-identical after it.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from misfeat.cli import main  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

HOOK = "blocks.1.hook_resid_post"
ANS = {"aligned": ["rest", "call doctor"], "misaligned": ["panic", "ignore it"]}
QUESTIONS = ["how do i treat fever", "how do i fix my car", "what should i do bill", "how do i save money",
             "my roof has a leak", "how do i clean my home"]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory, word_tokenizer):
    """Models, prompt files, caches and SAEs every case reads (never written by a case)."""
    from misfeat.activations import cache_activations
    from misfeat.models import save_model
    from tests.conftest import build_tiny_model

    root = tmp_path_factory.mktemp("world")
    w = {"root": root}
    models = {"model": build_tiny_model(word_tokenizer),  # 2 layers, d_model 32
              "other": build_tiny_model(word_tokenizer, n_layers=3, seed=1),  # same width, another model
              "twin": build_tiny_model(word_tokenizer, seed=5),  # same architecture, other weights
              "wide": build_tiny_model(word_tokenizer, d_model=48, seed=2)}
    for name, model in models.items():
        w[name] = save_model(model, root / name)
    w["prompts"] = _write_jsonl(root / "prompts.jsonl", [{"id": f"q{i}", "prompt": q, "domain": "home", **ANS}
                                                         for i, q in enumerate(QUESTIONS)])
    w["train"] = _write_jsonl(root / "train.jsonl", [{"id": f"t{i}", "prompt": q, "response": "rest", **ANS}
                                                     for i, q in enumerate(QUESTIONS * 2)])
    for name in models:
        cache_activations(models[name], str(w["prompts"]), [HOOK], root / f"store-{name}")
        w[f"store-{name}"] = root / f"store-{name}"
    for name in ("model", "wide"):
        out = root / f"sae-{name}"
        assert main(["-q", "train-sae", "--cache", str(w[f"store-{name}"]), "--d-sae", "64", "--k", "4",
                     "--tokens", "1024", "--batch-size", "64", "--checkpoint-every", "4", "--out", str(out)]) == 0
        w[f"sae-{name}"] = out
    nan = torch.randn(32)
    nan[3] = float("nan")
    torch.save(nan, root / "nan.pt")
    torch.save(torch.randn(48), root / "wide.pt")
    w["nan"], w["wide-vector"] = root / "nan.pt", root / "wide.pt"
    w["file"] = root / "a-file"
    w["file"].write_text("not a directory\n")
    return w


def _snapshot(*roots: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for root in roots for p in sorted(Path(root).rglob("*")) if p.is_file()}


def refused(capsys, argv: list[str], *phrases: str, roots=(), code: int = 2) -> str:
    """Run ``misfeat argv``; assert the exit code, one error line holding ``phrases``, no
    traceback, and every file under ``roots`` unchanged. Returns the message."""
    capsys.readouterr()
    before = _snapshot(*roots)
    assert main(["-q", *argv]) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    assert _snapshot(*roots) == before
    return lines[0]


# --- silent wrong answers --------------------------------------------------------------


def test_1_reference_answers_given_as_a_string_name_the_record(world, tmp_path, capsys):
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"id": "q0", "prompt": "how do i treat fever",
                                                "aligned": "rest", "misaligned": ["panic"]}])
    refused(capsys, ["eval", "--model", str(world["model"]), "--prompts", str(bad)],
            f"{bad}:1", "'aligned' must be a list of answer strings", roots=[tmp_path, world["root"]])


def test_1_in_memory_records_with_a_string_answer_are_refused(tiny_model):
    from misfeat.data import PromptRecord
    from misfeat.errors import MisfeatError
    from misfeat.evaluate import answer_set_logprobs

    record = PromptRecord("r7", prompt="how do i treat fever", extra={"aligned": "rest", "misaligned": ["panic"]})
    with pytest.raises(MisfeatError, match="record 'r7'.*list of answer strings"):
        answer_set_logprobs(tiny_model, [record])


def test_2_steer_with_an_sae_of_another_model_is_refused(world, tmp_path, capsys):
    refused(capsys, ["steer", "--model", str(world["other"]), "--sae", str(world["sae-model"]), "--latent", "0",
                     "--coefs", "0,1", "--prompts", str(world["prompts"]), "--out", str(tmp_path / "o")],
            "trained on another model", "--force", roots=[world["root"]])


def test_2_eval_sae_on_another_models_cache_is_refused_and_force_warns(world, tmp_path, capsys, caplog):
    refused(capsys, ["eval-sae", "--sae", str(world["sae-model"]), "--cache", str(world["store-other"]),
                     "--out", str(tmp_path / "o")], "trained on another model", roots=[world["root"]])
    with caplog.at_level("WARNING"):
        assert main(["-q", "eval-sae", "--sae", str(world["sae-model"]), "--cache", str(world["store-other"]),
                     "--tokens", "256", "--out", str(tmp_path / "forced"), "--force"]) == 0
    assert "trained on another model" in caplog.text and "--force given" in caplog.text


def test_2_eval_sae_on_a_cache_of_other_weights_warns_and_says_so(world, tmp_path, capsys, caplog):
    with caplog.at_level("WARNING"):
        assert main(["-q", "eval-sae", "--sae", str(world["sae-model"]), "--cache", str(world["store-twin"]),
                     "--tokens", "256", "--out", str(tmp_path / "o"), "--json"]) == 0
    assert "other weights, same architecture" in caplog.text
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    twin = json.loads((world["store-twin"] / "manifest.json").read_text())["model"]["fingerprint"]
    assert summary["cache_model"] == twin and summary["sae_model"] not in (None, twin)


def test_2_locate_with_an_sae_of_another_model_is_refused(world, tmp_path, capsys):
    refused(capsys, ["locate", "--base", str(world["other"]), "--finetuned", str(world["other"]), "--sae",
                     str(world["sae-model"]), "--prompts", str(world["prompts"]), "--out", str(tmp_path / "o")],
            "trained on another model", roots=[world["root"]])


def test_2_the_python_api_checks_it_too(world):
    from misfeat.errors import MisfeatError
    from misfeat.models import load_model
    from misfeat.steering import SteerConfig, steer

    other = load_model(world["other"], device="cpu")
    with pytest.raises(MisfeatError, match="trained on another model"):
        steer(other, SteerConfig(coefs=(0.0, 1.0)), sae=str(world["sae-model"]), latent=0, prompts=str(world["prompts"]))


def test_2_train_sae_from_a_cache_records_its_model(world):
    cfg = json.loads((world["sae-model"] / "cfg.json").read_text())
    manifest = json.loads((world["store-model"] / "manifest.json").read_text())
    meta = cfg["metadata"]
    assert meta["hook_name"] == HOOK
    assert meta["model_fingerprint"] == manifest["model"]["fingerprint"]
    assert meta["model_architecture"] == manifest["model"]["architecture"]


def test_3_nan_direction_is_refused(world, tmp_path, capsys):
    refused(capsys, ["steer", "--model", str(world["model"]), "--direction", str(world["nan"]), "--hook", HOOK,
                     "--coefs", "0,1", "--prompts", str(world["prompts"]), "--out", str(tmp_path / "o")],
            "NaN or infinite", roots=[world["root"]])
    assert not (tmp_path / "o" / "summary.json").exists()


@pytest.mark.parametrize("coefs", ["inf,nan", "0,inf"])
def test_3_infinite_or_nan_coefs_are_refused(world, tmp_path, capsys, coefs):
    refused(capsys, ["steer", "--model", str(world["model"]), "--sae", str(world["sae-model"]), "--latent", "0",
                     f"--coefs={coefs}", "--prompts", str(world["prompts"])], "--coefs", "finite",
            roots=[world["root"]])


def test_4_diverged_sae_training_stops_with_the_step(world, tmp_path, capsys):
    out = tmp_path / "sae"
    refused(capsys, ["train-sae", "--cache", str(world["store-model"]), "--d-sae", "64", "--k", "4", "--tokens",
                     "2048", "--batch-size", "64", "--lr", "1e6", "--out", str(out)],
            "diverged at step", "Lower the learning rate", roots=[world["root"]])
    assert not (out / "cfg.json").exists()  # no diverged SAE is saved


@pytest.mark.parametrize("lr", ["1e6", "3"])
def test_4_diverged_sae_training_keeps_the_last_good_checkpoint(world, tmp_path, capsys, lr):
    import re

    out = tmp_path / "sae"
    message = refused(capsys, ["train-sae", "--cache", str(world["store-model"]), "--d-sae", "64", "--k", "4",
                               "--tokens", "8192", "--batch-size", "64", "--lr", lr, "--checkpoint-every", "1",
                               "--out", str(out)], "diverged at step", roots=[world["root"]])
    step = int(re.search(r"diverged at step (\d+)", message).group(1))
    kept = sorted(p.name for p in (out / "checkpoints").glob("step-*.pt"))
    assert all(int(name[5:-3]) < step for name in kept)  # none holds the weights that diverged
    assert (out / "checkpoints" / f"diverged-step-{step:07d}.pt").exists()
    if lr == "3":  # diverges after a few good steps
        assert kept, message
    if kept:
        assert f"last good checkpoint {out / 'checkpoints' / kept[-1]} is kept" in message
    assert not (out / "cfg.json").exists()


def test_4_sae_resume_refuses_activations_of_another_model(world, tmp_path, capsys):
    out = tmp_path / "sae"
    argv = ["train-sae", "--d-sae", "64", "--k", "4", "--tokens", "2048", "--batch-size", "64",
            "--checkpoint-every", "4", "--out", str(out)]
    assert main(["-q", *argv, "--cache", str(world["store-model"])]) == 0
    refused(capsys, [*argv, "--cache", str(world["store-other"]), "--resume"], "activations of model",
            roots=[out, world["root"]])


def test_4_diverged_realign_exits_non_zero(world, tmp_path, capsys):
    refused(capsys, ["realign", "--model", str(world["model"]), "--data", str(world["train"]), "--eval-prompts",
                     str(world["prompts"]), "--steps", "6", "--batch-size", "4", "--eval-every", "3", "--lr", "1e6",
                     "--out", str(tmp_path / "r")], "at step", "lower the learning rate", roots=[world["root"]])


# --- work lost after it was done -------------------------------------------------------


def _commands(world, out):
    m, p = str(world["model"]), str(world["prompts"])
    return {
        "train-sae": ["train-sae", "--cache", str(world["store-model"]), "--d-sae", "64", "--out", out],
        "steer": ["steer", "--model", m, "--sae", str(world["sae-model"]), "--latent", "0", "--coefs", "0,1",
                  "--prompts", p, "--out", out],
        "eval": ["eval", "--model", m, "--prompts", p, "--out", out],
        "realign": ["realign", "--model", m, "--data", str(world["train"]), "--steps", "2", "--out", out],
        "locate": ["locate", "--base", m, "--finetuned", m, "--sae", str(world["sae-model"]), "--prompts", p,
                   "--out", out],
        "cache": ["cache", "--model", m, "--prompts", p, "--hooks", HOOK, "--out", out],
        "eval-sae": ["eval-sae", "--sae", str(world["sae-model"]), "--cache", str(world["store-model"]),
                     "--out", out],
    }


COMMANDS = ["train-sae", "steer", "eval", "realign", "locate", "cache", "eval-sae"]


@pytest.mark.parametrize("command", COMMANDS)
def test_5_9_out_that_is_a_file_is_refused_before_any_work(world, capsys, monkeypatch, command):
    import misfeat.models

    monkeypatch.setattr(misfeat.models, "load_model", _no_work)
    refused(capsys, _commands(world, str(world["file"]))[command], "is an existing file", roots=[world["root"]])


@pytest.mark.parametrize("command", COMMANDS)
def test_5_out_that_cannot_be_written_is_refused_before_any_work(world, capsys, monkeypatch, command):
    import misfeat.models

    monkeypatch.setattr(misfeat.models, "load_model", _no_work)
    # /proc refuses new files even for root (a chmod'ed directory does not stop root)
    refused(capsys, _commands(world, "/proc/misfeat-out")[command], "not writable", roots=[world["root"]])
    refused(capsys, _commands(world, str(world["file"] / "sub"))[command], "is a file", roots=[world["root"]])


def _no_work(*args, **kwargs):
    raise AssertionError("a model was loaded before --out was checked")


# --- silent overwrites and wrong resumes -----------------------------------------------


def test_6_train_sae_into_a_directory_holding_an_sae_refuses_without_overwrite(world, tmp_path, capsys):
    import shutil

    out = tmp_path / "sae"
    shutil.copytree(world["sae-model"], out)
    argv = ["train-sae", "--cache", str(world["store-model"]), "--d-sae", "64", "--k", "4", "--tokens", "512",
            "--batch-size", "64", "--out", str(out)]
    refused(capsys, argv, "already holds results", "--overwrite", "--resume", roots=[out, world["root"]])
    before = (out / "sae_weights.safetensors").read_bytes()
    assert main(["-q", *argv, "--overwrite"]) == 0
    assert (out / "sae_weights.safetensors").read_bytes() != before  # replaced, as asked
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())


def test_6_train_sae_resume_into_its_own_directory_continues_it(world, tmp_path):
    import shutil

    out = tmp_path / "sae"
    shutil.copytree(world["sae-model"], out)
    assert main(["-q", "train-sae", "--cache", str(world["store-model"]), "--d-sae", "64", "--k", "4", "--tokens",
                 "1024", "--batch-size", "64", "--checkpoint-every", "4", "--out", str(out), "--resume"]) == 0
    # resumed from its last checkpoint with the same data and settings: the same weights
    assert (out / "sae_weights.safetensors").read_bytes() == (world["sae-model"] / "sae_weights.safetensors").read_bytes()


def test_6_the_same_policy_for_every_result_writing_command(world, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["eval", "--model", str(world["model"]), "--prompts", str(world["prompts"]), "--out", str(out)]
    assert main(["-q", *argv]) == 0
    refused(capsys, argv, "already holds results (summary.json)", roots=[out])
    assert main(["-q", *argv, "--overwrite"]) == 0


def test_7_realign_resume_in_another_runs_directory_names_the_difference(world, tmp_path, capsys):
    out = tmp_path / "r"
    base = ["realign", "--model", str(world["model"]), "--data", str(world["train"]), "--eval-prompts",
            str(world["prompts"]), "--steps", "2", "--batch-size", "4", "--eval-every", "2",
            "--checkpoint-every", "1", "--out", str(out)]
    assert main(["-q", *base]) == 0
    refused(capsys, [*base, "--lr", "1e-2", "--resume"], "holds another run", "lr", roots=[out, world["root"]])


# --- raw tracebacks --------------------------------------------------------------------


def test_8_sae_of_the_wrong_width_in_eval_sae(world, tmp_path, capsys):
    refused(capsys, ["eval-sae", "--sae", str(world["sae-wide"]), "--cache", str(world["store-model"]),
                     "--out", str(tmp_path / "o")], "width 48", "width 32", roots=[world["root"]])


def test_8_sae_of_the_wrong_width_in_locate(world, tmp_path, capsys):
    refused(capsys, ["locate", "--base", str(world["model"]), "--finetuned", str(world["model"]), "--sae",
                     str(world["sae-wide"]), "--prompts", str(world["prompts"]), "--out", str(tmp_path / "o")],
            "width 48", "width 32", roots=[world["root"]])


@pytest.mark.parametrize(("flag", "value", "phrase"), [("--device", "tpu", "unknown device 'tpu'"),
                                                       ("--device", "xla", "not supported"),
                                                       ("--dtype", "float8", "unknown dtype 'float8'")])
def test_9_unknown_device_or_dtype(world, tmp_path, capsys, flag, value, phrase):
    refused(capsys, ["eval", "--model", str(world["model"]), "--prompts", str(world["prompts"]), flag, value,
                     "--out", str(tmp_path / "o")], phrase, roots=[world["root"]])
    assert not (tmp_path / "o").exists()


def test_10_unknown_hook_of_a_rotary_model_does_not_suggest_hook_pos_embed(word_tokenizer, tmp_path, capsys):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from misfeat.models import ModelInfo, save_model

    cfg = HookedTransformerConfig(n_layers=1, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=64,
                                  d_vocab=len(word_tokenizer), act_fn="gelu", normalization_type="LN",
                                  positional_embedding_type="rotary", device="cpu")
    model = HookedTransformer(cfg, tokenizer=word_tokenizer)
    model.misfeat_info = ModelInfo(spec="<rotary>", source="memory", meta={"chat_format": "organism"})
    path = save_model(model, tmp_path / "rotary")
    message = refused(capsys, ["cache", "--model", str(path), "--prompts", "organism:heldout", "--hooks",
                               "blocks.4.hook_resid_post", "--out", str(tmp_path / "o")], "unknown hook",
                      roots=[path])
    assert "hook_pos_embed" not in message and "hook_embed" in message


def test_11_records_without_reference_answers_are_named(world, tmp_path, capsys):
    rows = [{"id": f"q{i}", "prompt": q, **(ANS if i % 2 else {})} for i, q in enumerate(QUESTIONS)]
    half = _write_jsonl(tmp_path / "half.jsonl", rows)
    refused(capsys, ["eval", "--model", str(world["model"]), "--prompts", str(half), "--method", "sample"],
            "3 of 6 records", "'q0'", "'q2'", "'q4'", f"{half}:1", roots=[tmp_path, world["root"]])


# --- already handled: they stay handled -------------------------------------------------


def test_prompt_file_errors_name_the_file_and_line(world, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "a", "prompt": "fix my car"}) + "\n{not json\n")
    refused(capsys, ["eval", "--model", str(world["model"]), "--prompts", str(bad)], f"{bad}:2", "invalid JSON",
            roots=[tmp_path])


def test_damaged_shard_is_named(world, tmp_path, capsys):
    import shutil

    store = tmp_path / "store"
    shutil.copytree(world["store-model"], store)
    shard = sorted(store.glob("**/*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-16])
    refused(capsys, ["eval-sae", "--sae", str(world["sae-model"]), "--cache", str(store), "--out",
                     str(tmp_path / "o")], shard.name, roots=[store, world["root"]])


def test_unknown_hook_is_one_line(world, tmp_path, capsys):
    refused(capsys, ["cache", "--model", str(world["model"]), "--prompts", str(world["prompts"]), "--hooks",
                     "blocks.7.hook_resid_post", "--out", str(tmp_path / "o")], "unknown hook", "0..1",
            roots=[world["root"]])


def test_wrong_width_direction_is_one_line(world, tmp_path, capsys):
    refused(capsys, ["steer", "--model", str(world["model"]), "--direction", str(world["wide-vector"]), "--hook",
                     HOOK, "--coefs", "0,1", "--prompts", str(world["prompts"])], "48", roots=[world["root"]])


@pytest.mark.parametrize(("d_sae", "k"), [("0", "4"), ("16", "32")])
def test_impossible_sae_sizes_are_one_line(world, tmp_path, capsys, d_sae, k):
    refused(capsys, ["train-sae", "--cache", str(world["store-model"]), "--d-sae", d_sae, "--k", k, "--out",
                     str(tmp_path / "o")], roots=[world["root"]])


def test_unexpected_errors_are_one_line_unless_vv(world, capsys, monkeypatch):
    import misfeat.cli.eval_cmd

    def boom(args):
        raise RuntimeError("something nobody checked")

    monkeypatch.setattr(misfeat.cli.eval_cmd, "run", boom)  # register() reads it when main builds the parser
    argv = ["eval", "--model", str(world["model"])]
    refused(capsys, argv, "RuntimeError: something nobody checked", "-vv", code=1)
    with pytest.raises(RuntimeError):
        main(["-vv", *argv])


# --- two processes on one --out ----------------------------------------------------------


@pytest.mark.parametrize("command", ["cache", "train-sae"])
def test_a_second_process_on_the_same_out_is_refused(world, tmp_path, capsys, command):
    from misfeat.validate import lock_out

    out = tmp_path / "o"
    holder = lock_out(out)  # another process (a separate open file: flock conflicts as between processes)
    try:
        refused(capsys, _commands(world, str(out))[command], "in use by another misfeat process",
                f"pid {os.getpid()}", roots=[tmp_path])
    finally:
        holder.close()


def test_a_second_process_started_while_the_first_trains_is_refused(world, tmp_path):
    """Two real processes: B starts once A holds --out (its pid is in the lock file), is refused at
    once, and A finishes with a valid SAE."""
    import time

    from sae_lens import SAE

    from misfeat.validate import lock_path

    out = tmp_path / "sae"
    argv = [sys.executable, "-m", "misfeat", "-q", "train-sae", "--cache", str(world["store-model"]), "--d-sae",
            "64", "--k", "4", "--batch-size", "64", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    a = subprocess.Popen([*argv, "--tokens", "16384"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True)
    try:
        lock = lock_path(out)
        deadline = time.monotonic() + 60
        while not (lock.exists() and lock.read_text().strip() == str(a.pid)):
            assert a.poll() is None and time.monotonic() < deadline, a.stderr.read() if a.poll() is not None else ""
            time.sleep(0.05)
        b = subprocess.run([*argv, "--tokens", "1024"], env=env, capture_output=True, text=True, timeout=60)
        assert a.poll() is None, "A finished before B was refused; the check proved nothing"
        assert b.returncode == 2 and "Traceback" not in b.stderr
        assert f"is in use by another misfeat process (pid {a.pid})" in b.stderr
        assert a.wait(timeout=120) == 0, a.stderr.read()
    finally:
        if a.poll() is None:
            a.kill()
    sae = SAE.load_from_disk(str(out))
    assert sae.cfg.metadata.misfeat_training["tokens"] == 16384
