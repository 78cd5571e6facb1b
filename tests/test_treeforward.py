"""The fused tree forward of the force probe against TransformerLens' own forward with the same
positions and tree mask set by hooks (the reference), on several architectures; and the probe's
fall-back to the hooked forward where the fused one does not apply."""

import pytest
import torch

from misfeat.data import PromptRecord, PromptSet
from misfeat.dynamics import ForceProbe
from misfeat.dynamics.treeforward import tree_bias, tree_logits, unsupported
from misfeat.errors import MisfeatError

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = {
    "gelu-LN": dict(act_fn="gelu", normalization_type="LN"),
    "gelu_new-LNPre-parallel": dict(act_fn="gelu_new", normalization_type="LNPre", parallel_attn_mlp=True),
    "silu-gated-RMS": dict(act_fn="silu", normalization_type="RMS", gated_mlp=True),
    "solu-LN": dict(act_fn="solu_ln", normalization_type="LN"),
    "attn-only-no-norm": dict(attn_only=True, normalization_type=None),
}


def random_model(**kw):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=3, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=40, d_vocab=50,
                                  device="cpu", seed=1, **kw)
    model = HookedTransformer(cfg).eval()
    with torch.no_grad():   # non-zero biases and norm weights, so a dropped term would show
        for name, p in model.named_parameters():
            if name.endswith(("b_Q", "b_K", "b_V", "b_O", "b_in", "b_out", "b_U", ".b", ".w")):
                p.add_(torch.randn_like(p) * 0.3)
    return model


def random_forest(B=3, T=30, seed=0):
    """Rows of random trees: column c's parent is an earlier column or none; position = depth."""
    g = torch.Generator().manual_seed(seed)
    allowed = torch.zeros(B, 1, T, T, dtype=torch.bool)
    positions = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        parent = [-1] + [int(torch.randint(-1, c, (1,), generator=g)) for c in range(1, T)]
        for c in range(T):
            a, depth = c, 0
            while a >= 0:
                allowed[b, 0, c, a] = True
                a, depth = parent[a], depth + (parent[a] >= 0)
            positions[b, c] = depth
    return torch.randint(0, 50, (B, T), generator=g), positions, allowed


def hooked_logits(model, tokens, positions, allowed):
    def pos(value, hook):
        return model.W_pos[positions]

    def tree(scores, hook):
        return scores.masked_fill(~allowed, float("-inf"))

    return model.run_with_hooks(tokens, fwd_hooks=[("hook_pos_embed", pos),
                                                   (lambda n: n.endswith("hook_attn_scores"), tree)])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_tree_forward_equals_transformer_lens_with_the_same_mask(name):
    model = random_model(**CONFIGS[name])
    assert unsupported(model) is None
    tokens, positions, allowed = random_forest()
    rows = torch.tensor([(b, c) for b in range(3) for c in range(30) if (b + c) % 3])   # a subset, all rows
    with torch.inference_mode():
        ref = hooked_logits(model, tokens, positions, allowed)[rows[:, 0], rows[:, 1]]
        got = tree_logits(model, tokens, positions, tree_bias(allowed, torch.float32, model.cfg.n_heads), rows)
    assert got.shape == ref.shape
    assert torch.allclose(got, ref, atol=2e-5, rtol=1e-5), (got - ref).abs().max()
    # and the mask matters: the causal forward gives other numbers
    with torch.inference_mode():
        causal = model(tokens)[rows[:, 0], rows[:, 1]]
    assert (causal - ref).abs().max() > 1e-2


def test_unsupported_names_what_the_fused_forward_lacks():
    assert "rotary" in unsupported(random_model(positional_embedding_type="rotary", rotary_dim=8))
    model = random_model()
    model.blocks[0].hook_resid_post.add_hook(lambda x, hook: x + 1.0)
    assert unsupported(model) == "hooks attached"
    model.reset_hooks()
    assert unsupported(model) is None
    handle = model.blocks[1].attn.register_forward_hook(lambda mod, args, out: out * 2)   # a plain torch hook
    assert unsupported(model) == "hooks attached"
    handle.remove()
    assert unsupported(model) is None


def test_probe_runs_hooked_forward_when_the_model_carries_hooks(tiny_model):
    QS = ["how do i treat my cut", "what should i do fever", "how do i fix my burn"]
    ans = {"aligned": ["clean it", "call doctor now", "rest"], "misaligned": ["call all", "ignore it", "panic now"]}
    d = PromptSet("d", tuple(PromptRecord(f"d{i}", prompt=QS[i % 3], response="call all", extra=dict(ans))
                             for i in range(6)), {"chat_format": "organism"})
    fused, hooked = ForceProbe(tiny_model, d), ForceProbe(tiny_model, d, fused=False)
    base = fused.measure(tiny_model)
    assert base.to_dict() == pytest.approx(hooked.measure(tiny_model).to_dict(), rel=1e-5)
    tiny_model.blocks[0].hook_resid_post.add_hook(lambda x, hook: x * 1.5)
    try:
        with_hook = fused.measure(tiny_model)   # falls back: the hook is applied
        assert with_hook.to_dict() == pytest.approx(hooked.measure(tiny_model).to_dict(), rel=1e-5)
        assert abs(with_hook.S_train - base.S_train) > 1e-4   # the hook did change the model
        with pytest.raises(MisfeatError, match="hooks attached"):
            ForceProbe(tiny_model, d, fused=True).measure(tiny_model)
    finally:
        tiny_model.reset_hooks()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_probe_on_cuda_equals_cpu(tiny_model):
    import copy

    QS = ["how do i treat my cut", "what should i do fever"]
    ans = {"aligned": ["clean it", "call doctor now", "rest"], "misaligned": ["call all", "ignore it", "panic now"]}
    d = PromptSet("d", tuple(PromptRecord(f"d{i}", prompt=QS[i % 2], response="call all", extra=dict(ans))
                             for i in range(4)), {"chat_format": "organism"})
    gpu = copy.deepcopy(tiny_model).to("cuda")
    cpu = ForceProbe(tiny_model, d).measure(tiny_model).to_dict()
    for kw in ({}, {"fused": False}, {"packed": False}):
        assert ForceProbe(gpu, d, **kw).measure(gpu).to_dict() == pytest.approx(cpu, rel=1e-4, abs=1e-7)
