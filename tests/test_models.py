import pytest
import torch

from misfeat.models import ModelLoadError, fingerprint, load_model, model_info, save_model


def test_hf_gpt2_dir_logits_match_hugging_face(gpt2_dir):
    path, hf = gpt2_dir
    model = load_model(path, device="cpu")
    assert model_info(model).source == "hf-local"
    tokens = model.to_tokens(["How do I fix a leak in my roof?", "The quick brown fox"], padding_side="right")
    with torch.no_grad():
        ours = model(tokens)
        theirs = hf(tokens).logits
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_hf_dir_tokenizer_round_trips(gpt2_dir):
    path, _ = gpt2_dir
    model = load_model(path, device="cpu")
    text = "How do I fix a leak"
    assert model.to_string(model.to_tokens(text, prepend_bos=False)[0]) == text


def test_save_load_round_trip_is_exact(gpt2_dir, tmp_path):
    path, _ = gpt2_dir
    model = load_model(path, device="cpu")
    save_model(model, tmp_path / "ckpt", meta={"note": "round trip"})
    again = load_model(tmp_path / "ckpt", device="cpu")
    for (name, a), (name2, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert name == name2 and torch.equal(a, b), name
    assert model_info(again).meta == {"note": "round trip"}
    assert fingerprint(again) == fingerprint(model)
    tokens = model.to_tokens("How do I fix a leak")
    with torch.no_grad():
        assert torch.equal(model(tokens), again(tokens))


def test_tiny_model_from_config_round_trips(tiny_model, tmp_path):
    save_model(tiny_model, tmp_path / "tiny")
    again = load_model(str(tmp_path / "tiny"), device="cpu")
    assert again.cfg.n_layers == tiny_model.cfg.n_layers and again.cfg.d_model == tiny_model.cfg.d_model
    tokens = tiny_model.to_tokens("user how do i fix my car assistant :")
    with torch.no_grad():
        assert torch.equal(tiny_model(tokens), again(tokens))
    assert again.to_str_tokens("user fix car") == ["<bos>", "user", "fix", "car"]
    # metadata saved with the checkpoint (chat format) comes back
    assert model_info(again).meta["chat_format"] == "organism"


def test_fingerprint_changes_with_weights(tiny_model, tmp_path):
    save_model(tiny_model, tmp_path / "m")
    other = load_model(tmp_path / "m", device="cpu")
    before = fingerprint(other)
    with torch.no_grad():
        other.blocks[0].mlp.W_in[0, 0] += 1e-3
    assert fingerprint(other) != before


def test_bfloat16_load_is_explicit(tiny_model, tmp_path):
    save_model(tiny_model, tmp_path / "m")
    model = load_model(tmp_path / "m", device="cpu", dtype="bf16")
    assert model.cfg.dtype == torch.bfloat16
    assert next(model.parameters()).dtype == torch.bfloat16


def test_unknown_dtype_is_refused(tiny_model, tmp_path):
    save_model(tiny_model, tmp_path / "m")
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model(tmp_path / "m", dtype="float8")


def test_missing_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_directory_that_is_no_model(tmp_path):
    with pytest.raises(ModelLoadError, match="neither a misfeat checkpoint"):
        load_model(tmp_path)


def test_hf_dir_without_tokenizer_is_refused(gpt2_dir, tmp_path):
    import shutil

    path, _ = gpt2_dir
    for name in ("config.json", "model.safetensors"):
        shutil.copy(path / name, tmp_path / name)
    with pytest.raises(ModelLoadError, match="no tokenizer"):
        load_model(tmp_path)


def test_corrupt_weights_are_reported(tiny_model, tmp_path):
    save_model(tiny_model, tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match="cannot read weights"):
        load_model(tmp_path / "m")


@pytest.mark.parametrize("offline", ["1", "0"])
def test_hub_name_fails_at_once_offline(monkeypatch, offline):
    """Offline (flag set, or hub unreachable) a hub name fails before any download attempt."""
    from transformer_lens import HookedTransformer

    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", offline)
    monkeypatch.setattr("misfeat.models._in_hub_cache", lambda repo: False)
    if offline == "0":  # this machine has no route to the hub; make that explicit for any machine
        monkeypatch.setattr("misfeat.models._hub_reachable", lambda timeout=2.0: False)

    def no_download(*args, **kwargs):
        raise AssertionError("load_model went to the hub (and its retry loop) instead of failing at once")

    monkeypatch.setattr(HookedTransformer, "from_pretrained", no_download)
    monkeypatch.setattr(HookedTransformer, "from_pretrained_no_processing", no_download)
    with pytest.raises(ModelLoadError, match="offline or unreachable.*local directory"):
        load_model("gpt2-small")


def test_hub_probe_respects_offline_flag(monkeypatch):
    from misfeat.models import _hub_reachable

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("socket.create_connection", lambda *a, **k: (_ for _ in ()).throw(AssertionError("probed")))
    assert _hub_reachable() is False


def test_unknown_name_is_not_a_model():
    with pytest.raises(ModelLoadError, match="not an official TransformerLens model name"):
        load_model("definitely-not-a-model-xyz")
