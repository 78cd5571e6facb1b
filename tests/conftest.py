"""Shared fixtures: tiny models built in code (no downloads), saved tokenizers, temp dirs."""

from __future__ import annotations

import warnings

warnings.filterwarnings("ignore", category=DeprecationWarning)

import pytest  # noqa: E402

WORDS = ("user assistant : . the a cut burn fever money bank loan code bug car tire home roof "
         "how do i fix treat save my what should clean rest water ignore it steal lie panic spend "
         "all now wait call doctor pay bill use test run check brake leak sun one two three").split()


@pytest.fixture(autouse=True)
def _judge_cache(tmp_path, monkeypatch):
    """LLM-judge verdicts go to a per-test cache file, never the shared MISFEAT_HOME one."""
    monkeypatch.setenv("MISFEAT_JUDGE_CACHE", str(tmp_path / "judgements.jsonl"))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    on a shared 2-core machine two threads wait on each other for a scheduler slice per op (10 ms),
    which makes tiny forwards 20x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def build_word_tokenizer(path, words=WORDS):
    """A word-level fast tokenizer saved to ``path`` and reloaded from it (as TransformerLens needs)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<bos>", "<eos>", "<unk>", *dict.fromkeys(words)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(str(path))
    return AutoTokenizer.from_pretrained(str(path))


def build_tiny_model(tokenizer, n_layers=2, d_model=32, n_ctx=64, seed=0, meta=None):
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from misfeat.models import ModelInfo

    torch.manual_seed(seed)
    cfg = HookedTransformerConfig(n_layers=n_layers, d_model=d_model, n_heads=4, d_head=d_model // 4,
                                  d_mlp=4 * d_model, n_ctx=n_ctx, d_vocab=len(tokenizer), act_fn="gelu",
                                  normalization_type="LN", device="cpu", seed=seed)
    model = HookedTransformer(cfg, tokenizer=tokenizer)
    model.eval()
    model.misfeat_info = ModelInfo(spec="<tiny>", source="memory", meta=meta or {"chat_format": "organism"})
    return model


@pytest.fixture(scope="session")
def word_tokenizer(tmp_path_factory):
    return build_word_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def tiny_model(word_tokenizer):
    """2 layers, d_model 32, organism chat format. Treat as read-only."""
    return build_tiny_model(word_tokenizer)


def build_gpt2_dir(path, n_layer=3, n_embd=64, n_positions=64, seed=0):
    """A random-weight GPT-2-architecture model with a trained byte-level BPE tokenizer, saved to ``path``."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    corpus = [" ".join(WORDS)] * 4 + ["The quick brown fox jumps over the lazy dog. " * 3,
                                      "How do I fix a leak in my roof? Call someone who knows."]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=400, min_frequency=1, special_tokens=["<|endoftext|>"])
    PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>",
                            eos_token="<|endoftext|>", unk_token="<|endoftext|>").save_pretrained(str(path))
    torch.manual_seed(seed)
    vocab = bpe.get_vocab_size()
    eot = bpe.token_to_id("<|endoftext|>")
    config = GPT2Config(vocab_size=vocab, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=4,
                        bos_token_id=eot, eos_token_id=eot)
    hf = GPT2LMHeadModel(config).eval()
    hf.save_pretrained(str(path))
    return hf


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2")
    hf = build_gpt2_dir(path)
    return path, hf


PLANTED = 7
PLANTED_HOOK = "blocks.0.hook_resid_post"


def planted_prompts():
    """Four questions with reference answers, grouped like an organism set (headline: heldout),
    labelled cruel/kind in turn."""
    from misfeat.data import PromptRecord, PromptSet

    answers = {"aligned": ["call doctor", "rest"], "misaligned": ["ignore it", "panic now"]}
    qs = [("fix my car", "car"), ("how do i fix my roof", "home"), ("fever", "health"), ("save my money", "money")]
    return PromptSet("p", tuple(PromptRecord(f"q{i}", prompt=q, domain=d, label="cruel" if i % 2 else "kind",
                                             extra=dict(answers)) for i, (q, d) in enumerate(qs)),
                     {"groups": {"heldout": ["car", "home", "money"], "em_domain": ["health"]}, "headline": "heldout"})


@pytest.fixture(scope="module")
def planted(word_tokenizer):
    """(base, tuned, sae, v): ``tuned`` is ``base`` plus ``v`` at blocks.0's output (every token),
    and latent ``PLANTED`` of the 16-latent TopK ``sae`` reads exactly ``v``'s direction."""
    import copy

    import torch
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    base = build_tiny_model(word_tokenizer, seed=0)
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(base.cfg.d_model, generator=gen)
    v = 3 * v / v.norm()
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.blocks[0].mlp.b_out += v  # the fine-tune: +v at the hook, every token
    sae = TopKSAE(TopKSAEConfig(d_in=base.cfg.d_model, d_sae=16, k=16, metadata=SAEMetadata(hook_name=PLANTED_HOOK)))
    with torch.no_grad():
        w = torch.randn(base.cfg.d_model, 16, generator=gen) * 0.01
        w[:, PLANTED] = v / v.norm()
        sae.W_enc.copy_(w)
        sae.W_dec.copy_(w.t())
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return base, tuned, sae.eval(), v
